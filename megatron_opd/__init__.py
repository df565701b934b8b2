"""megatron_opd: on-policy distillation of reasoning LLMs on Megatron-Core, with vLLM rollouts."""

__version__ = "0.1.0"
