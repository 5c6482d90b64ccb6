# The two commands of the README: `make demo` and `make test`. Both build their
# own virtual environments; torch is pinned to the CPU build that lies on this
# machine's disk (an open range would download a multi-GB CUDA build).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
VENV_HF4 := .venv-hf4
PYTEST_ARGS ?=

.PHONY: demo test test-main test-hf4 bench bench-quick upstream clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[hf,test]"
	touch $@

# transformers 4.57 (the last 4.x) for the Hugging Face tests.
$(VENV_HF4)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV_HF4)
	$(VENV_HF4)/bin/pip install -q --upgrade pip
	$(VENV_HF4)/bin/pip install -q "$(TORCH)"
	$(VENV_HF4)/bin/pip install -q -e ".[test]" "transformers==4.57.*"
	touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/python -m attnpatch.demo

test: test-main test-hf4

test-main: $(VENV)/.ready
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-hf4: $(VENV_HF4)/.ready
	$(VENV_HF4)/bin/python -m pytest tests/hf $(PYTEST_ARGS)

bench: $(VENV)/.ready
	$(VENV)/bin/python -m benchmarks.run

bench-quick: $(VENV)/.ready
	$(VENV)/bin/python -m benchmarks.run --quick

# PyTorch's own tests of SDPA, nn.MultiheadAttention and the attention-bias API,
# without then with attnpatch (tests/upstream). Not part of `test`: it needs the
# test files of the installed torch's release (a sparse clone, network) and runs
# for tens of minutes on 2 cores. Writes benchmarks/results/upstream-cpu.md.
upstream: $(VENV)/.ready
	$(VENV)/bin/pip install -q "expecttest>=0.2"
	$(VENV)/bin/python -m tests.upstream --fetch

clean:
	rm -rf $(VENV) $(VENV_HF4)
