# The commands of the README: `make demo`, `make test`, `make matrix` and
# `make lint`. Each builds its own virtual environments; the main ones pin torch
# to the CPU build that lies on this machine's disk (an open range would
# download a multi-GB CUDA build).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
VENV_HF4 := .venv-hf4
VENV_NOX := .venv-nox
VENV_LINT := .venv-lint
PYTEST_ARGS ?=
# `make matrix PY=3.13 TORCH=2.15 TRANSFORMERS=5.24` runs one entry of
# noxfile.py; any of the three alone runs every entry with that release.
PY ?=
TORCH ?=
TRANSFORMERS ?=
# `make test` (CI) runs the oldest and the newest entry of the version matrix
# (benchmarks/versions.py), side by side: the oldest Python, torch,
# transformers and wrapt we support, and the newest. Every test runs in the
# newest leg; the oldest leg leaves out the tests marked any_version (their
# outcome cannot depend on a Python, torch or transformers release:
# pyproject.toml). Their environments (about 5 GB each, mostly hard links into
# uv's cache) live in the clone (.nox/edges, one per entry) and are reused by
# its next run; uv's cache lies outside it (EDGE_CACHE), shared by every clone
# on the machine (uv locks it), so that runs from two clones at once never
# share an environment. EDGE_RECORD=1 also writes their results into the
# versions table, as `make matrix` does, and then runs every test in both legs
# (off by default: `make test` leaves the tree as it found it).
test-edge-oldest: EDGE_PYTHON := 3.10
test-edge-oldest: EDGE_ENTRY := tests(python='3.10', torch='2.5', transformers='4.57')
test-edge-oldest: EDGE_SELECT := -m "not any_version"
test-edge-newest: EDGE_PYTHON := 3.13
test-edge-newest: EDGE_ENTRY := tests(python='3.13', torch='2.15', transformers='5.24')
test-edge-newest: EDGE_SELECT :=
EDGE_CACHE ?= $(HOME)/.cache/attnpatch-ci
EDGE_ENVS ?= $(CURDIR)/.nox/edges
EDGE_RECORD ?= 0

.PHONY: demo test test-main test-hf4 test-edges test-edge-oldest test-edge-newest matrix lint bench bench-quick cuda-report upstream clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[hf,test,export]"
	touch $@

# transformers 4.57 (the last 4.x) for the Hugging Face tests.
$(VENV_HF4)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV_HF4)
	$(VENV_HF4)/bin/pip install -q --upgrade pip
	$(VENV_HF4)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV_HF4)/bin/pip install -q -e ".[test]" "transformers==4.57.*"
	touch $@

# nox and uv, for the version matrix.
$(VENV_NOX)/.ready:
	$(PYTHON) -m venv $(VENV_NOX)
	$(VENV_NOX)/bin/pip install -q "nox>=2024.10.9" "uv>=0.5"
	touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/python -m attnpatch.demo

# Lint first (seconds; a lint or type error stops here), then the two legs side
# by side (one leg alone keeps about 1.3 of 2 cores busy: much of it is
# subprocesses starting torch), each leg's output printed whole when it ends,
# with its time.
test: lint
	$(MAKE) --jobs=2 --keep-going --output-sync=target test-edge-oldest test-edge-newest

# The whole suite on this machine's CPU build of torch 2.13 with transformers 5
# (test-main) and on the same torch with transformers 4.57 (test-hf4, the
# Hugging Face tests): quick checks while working, not part of `make test`.
test-main: $(VENV)/.ready
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-hf4: $(VENV_HF4)/.ready
	$(VENV_HF4)/bin/python -m pytest tests/hf $(PYTEST_ARGS)

test-edges: test-edge-oldest test-edge-newest

test-edge-oldest test-edge-newest: $(VENV_NOX)/.ready
	@$(VENV_NOX)/bin/python -m benchmarks.versions find-python $(EDGE_PYTHON) > /dev/null \
		|| { echo "$@: needs Python $(EDGE_PYTHON) for $(EDGE_ENTRY)" >&2; exit 1; }
	@started=$$(date +%s); \
	UV_CACHE_DIR=$(EDGE_CACHE)/uv ATTNPATCH_MATRIX_RECORD=$(EDGE_RECORD) $(VENV_NOX)/bin/python -m nox \
		--envdir $(EDGE_ENVS) --reuse-venv=yes --error-on-missing-interpreters -s "$(EDGE_ENTRY)" \
		-- $(if $(filter 1,$(EDGE_RECORD)),,$(EDGE_SELECT)) $(PYTEST_ARGS); \
	status=$$?; echo "$@ ($(EDGE_ENTRY)): exit $$status after $$(( $$(date +%s) - started )) s"; exit $$status

# Every entry in sequence (hours on 2 cores); each one's environment and uv
# cache are deleted after its run, so the disk holds one entry at a time.
matrix: $(VENV_NOX)/.ready
	ATTNPATCH_MATRIX_PYTHON=$(PY) ATTNPATCH_MATRIX_TORCH=$(TORCH) ATTNPATCH_MATRIX_TRANSFORMERS=$(TRANSFORMERS) \
		ATTNPATCH_MATRIX_DROP_ENVS=1 UV_CACHE_DIR=$(CURDIR)/.nox/uv-cache \
		$(VENV_NOX)/bin/python -m nox --error-on-missing-interpreters -s tests

# Lint, format and types (about a minute on a fresh clone, seconds after):
# ruff check and ruff format --check on the whole tree, mypy on the package
# (settings: pyproject.toml). They run in an environment of their own, built by
# uv in seconds, with the CPU build of torch 2.13 where pip's find-links has it
# (this machine's /opt/wheels), transformers 5 and pytest, whose types mypy
# checks against. Every step runs; the exit status says whether any failed.
LINT_TOOLS := "ruff==0.17.6" "mypy==2.4.1"
$(VENV_LINT)/.ready: pyproject.toml $(VENV_NOX)/.ready
	rm -rf $(VENV_LINT)
	$(VENV_NOX)/bin/uv venv -q --python $(PYTHON) $(VENV_LINT)
	$(if $(PIP_FIND_LINKS),UV_FIND_LINKS=$(PIP_FIND_LINKS)) $(VENV_NOX)/bin/uv pip install -q --python $(VENV_LINT)/bin/python \
		"$(TORCH_SPEC)" -e ".[hf,test]" $(LINT_TOOLS)
	touch $@

lint: $(VENV_LINT)/.ready
	@status=0; \
	echo "ruff check"; $(VENV_LINT)/bin/ruff check --output-format=concise . || status=1; \
	echo "ruff format --check"; $(VENV_LINT)/bin/ruff format --check . || status=1; \
	echo "mypy"; $(VENV_LINT)/bin/mypy --python-executable $(VENV_LINT)/bin/python || status=1; \
	exit $$status

bench: $(VENV)/.ready
	$(VENV)/bin/python -m benchmarks.run

bench-quick: $(VENV)/.ready
	$(VENV)/bin/python -m benchmarks.run --quick

# On a CUDA machine, with a Python whose torch sees the GPU (CUDA_PYTHON; no
# virtual environment is built, so nothing is downloaded): the GPU tests, every
# patched call in them checked by torch's sync debug mode; `attnpatch doctor`;
# the CUDA benchmarks. Reports, with device, versions and date, go under
# benchmarks/results/ (cuda-tests.txt, cuda-doctor.txt, cuda.md/json) to commit.
# All three run even if one fails; the exit status says whether any did.
CUDA_PYTHON ?= python3
CUDA_VERSIONS := import datetime, importlib.metadata as meta, importlib.util, torch, wrapt; \
	print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), torch.cuda.get_device_name(), \
	"torch", torch.__version__, "CUDA", torch.version.cuda, "wrapt", wrapt.__version__, \
	"transformers", importlib.util.find_spec("transformers") and meta.version("transformers"))
cuda-report:
	@$(CUDA_PYTHON) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "cuda-report: this torch sees no CUDA device")'
	{ $(CUDA_PYTHON) -c '$(CUDA_VERSIONS)' && $(CUDA_PYTHON) -m pytest tests/gpu -v -p no:cacheprovider; } \
		> benchmarks/results/cuda-tests.txt 2>&1; tests=$$?; cat benchmarks/results/cuda-tests.txt; \
	$(CUDA_PYTHON) -m attnpatch doctor > benchmarks/results/cuda-doctor.txt; doctor=$$?; \
	cat benchmarks/results/cuda-doctor.txt; \
	$(CUDA_PYTHON) -m benchmarks.run --device cuda; bench=$$?; \
	echo "cuda-report: tests $$tests, doctor $$doctor, benchmarks $$bench (exit statuses)"; \
	test $$tests = 0 && test $$doctor = 0 && test $$bench = 0

# PyTorch's own tests of SDPA, nn.MultiheadAttention and the attention-bias API,
# without then with attnpatch (tests/upstream). Not part of `test`: it needs the
# test files of the installed torch's release (a sparse clone, network) and runs
# for tens of minutes on 2 cores. Writes benchmarks/results/upstream-cpu.md.
upstream: $(VENV)/.ready
	$(VENV)/bin/pip install -q "expecttest>=0.2"
	$(VENV)/bin/python -m tests.upstream --fetch

clean:
	rm -rf $(VENV) $(VENV_HF4) $(VENV_NOX) $(VENV_LINT) .nox
