"""vLLM rollouts, live refit from the sharded Megatron student, placement and transport."""
