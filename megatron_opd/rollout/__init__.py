"""vLLM rollouts, live refit from the sharded Megatron student, and the mismatch monitor."""
