# icehpc: the two commands of the README.
#   make demo   synthetic data → shards → pretrain (2 DeepSpeed ranks) → embed (2 MPI ranks) → κ → report → probe
#   make test   install everything (system packages where missing, .venv) and run the test suite
# Both create .venv/ when it is missing. On a cluster (not root) the system step only checks for
# MPI and Slurm and tells you which site modules to load.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU-capable pair that also imports timm (torch 2.13 + PyPI torchvision does not).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# command:Debian package
SYSTEM_DEPS := mpiexec:openmpi-bin mpicc:libopenmpi-dev slurmctld:slurm-wlm slurmd:slurm-wlm \
               munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server chromium:chromium
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo

.PHONY: all system venv test demo cluster-start cluster-stop bench-cpu clean-demo

all: test

system:
	@missing=""; for pair in $(SYSTEM_DEPS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -z "$${missing// /}" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[make] installing system packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "[make] missing system parts:$$missing"; \
	  echo "[make] not root: load your site's modules instead (e.g. 'module load openmpi slurm'); Slurm tests will be skipped."; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# Starts a real Slurm for the `slurm` tests when root and none is running: two nodes in network
# namespaces (for the `multinode` tests; the single-node tests run on it too), or one node where
# namespaces cannot be made. Stops exactly what it started, also when the tests fail.
CLUSTER_NODES ?= 2
test: system venv
	@started=0; multi=0; \
	if ! bash jobs/local-cluster.sh status >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  if [ "$(CLUSTER_NODES)" -gt 1 ] && bash jobs/local-cluster.sh start --nodes $(CLUSTER_NODES); then \
	    started=1; multi=1; \
	  else \
	    bash jobs/local-cluster.sh stop >/dev/null 2>&1 || true; \
	    bash jobs/local-cluster.sh start && started=1; fi; fi; \
	trap 'if [ $$started = 1 ]; then bash jobs/local-cluster.sh stop; fi' EXIT; \
	need_slurm=0; bash jobs/local-cluster.sh status >/dev/null 2>&1 && need_slurm=1; \
	need_mpi=0; command -v mpiexec >/dev/null && need_mpi=1; \
	ICEHPC_REQUIRE_SLURM=$$need_slurm ICEHPC_REQUIRE_MPI=$$need_mpi ICEHPC_REQUIRE_MULTINODE=$$multi OMP_NUM_THREADS=1 \
	  $(PY) -m pytest --durations=25 $(PYTEST_ARGS)

demo: system venv
	$(PY) -m icehpc pipeline --config configs/demo.yaml --out $(DEMO_OUT)

cluster-start:
	bash jobs/local-cluster.sh start

cluster-stop:
	bash jobs/local-cluster.sh stop

bench-cpu: venv
	$(PY) bench/shards.py && $(PY) bench/kappa.py && $(PY) bench/embed.py

clean-demo:
	rm -rf $(DEMO_OUT)
