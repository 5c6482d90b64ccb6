# The two commands of the README: `make demo` and `make test`. Both build their
# own virtual environments; torch is pinned to the CPU build that lies on this
# machine's disk (an open range would download a multi-GB CUDA build).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
VENV_HF4 := .venv-hf4
PYTEST_ARGS ?=

.PHONY: demo test test-main test-hf4 bench bench-quick clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[hf,test,export]"
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

clean:
	rm -rf $(VENV) $(VENV_HF4)
