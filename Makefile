# The two commands of README: `make demo` (the embedded default distillation) and `make test`.
.PHONY: setup demo test test-all test-slurm bench
PY := .venv/bin/python

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m megatron_opd.cli demo $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=15 -m "not slow and not gpu and not slurm" tests

test-all: setup
	$(PY) -m pytest -q tests

# launch.submit against a one-node SLURM on this machine (needs root; installs slurm-wlm and munge).
test-slurm: setup
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
	  || echo "slurm-wlm/munge could not be installed: the SLURM tests will skip"
	$(PY) -m pytest -q -m slurm tests/launch
