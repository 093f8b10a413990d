# The two commands a new user needs: `make test` and `make pretrain`.
# Both create .venv on first use. torch is pinned because a plain `torch`
# requirement would pull a multi-GB CUDA build onto CPU-only machines.
PY      := .venv/bin/python
TORCH   := torch==2.13.0
STAMP   := .venv/.moelib-installed
NP      ?= 4
# mpirun behind moelib's wrapper, so that Ctrl-C or SIGTERM saves a checkpoint (README: Stopping and saving).
# OpenMPI refuses root without --allow-run-as-root, and 4 ranks on a 2-core machine need --oversubscribe.
MPIRUN  := $(PY) -m moelib.parallel.mpirun --oversubscribe $(shell [ "$$(id -u)" = 0 ] && echo --allow-run-as-root)

.PHONY: test test-fast pretrain lint bench clean-venv

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,mpi,triton]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check moelib moelib_cuda recipes tools tests
	.venv/bin/lint-imports
	$(PY) -m pytest -q -x --durations=15 tests

# Under 5 minutes on 2 cores: leaves out the tests marked slow and those that start mpirun (marked dist).
test-fast: $(STAMP)
	$(PY) -m pytest -q -x --durations=10 -m "not slow and not dist" tests

pretrain: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) recipes/v3_pretrain.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check moelib moelib_cuda recipes tools tests
	.venv/bin/lint-imports

bench: $(STAMP)
	$(PY) tools/bench.py train-step --vs-hf

clean-venv:
	rm -rf .venv
