# Every target creates/uses the local .venv and installs what it needs (fresh Debian, Python 3.11).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test fuzz bench lint build format clean

# xgrammar (vLLM's structured-output backend) without its dependencies (torch): the tests
# compare lmgw's JSON-schema grammars with its compiler, in a subprocess with a torch stand-in.
$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	@touch $(STAMP)

# Rebuild the Cython extensions in place (needed after editing a .pyx), and write the bytecode
# of our sources: an editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set
# (common in containers) every `lmgw serve` and simulator process would compile ~40k lines at
# start (0.1 s+ of its start-up). Stale .pyc files are ignored by Python, never wrong.
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -m compileall -q -j 0 src simulators examples benchmarks >/dev/null

demo: build
	$(BIN)/python examples/demo.py

test: build
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzz targets of `make test` (tests/fuzz: HTTP bytes, API bodies, OpenAPI, SSE/ZeroMQ/tensor
# decoders) with many more examples; LMGW_FUZZ_EXAMPLES=N sets how many per target.
FUZZ_EXAMPLES ?= 2000
fuzz: build
	LMGW_FUZZ_EXAMPLES=$${LMGW_FUZZ_EXAMPLES:-$(FUZZ_EXAMPLES)} $(BIN)/python -m pytest -q tests/fuzz \
		tests/property/test_h1_fuzz.py $(PYTEST_ARGS)

bench: build
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/overhead.py --pd vllm-nixl
	$(BIN)/python benchmarks/floor.py
	$(BIN)/python benchmarks/stream_relay.py
	$(BIN)/python benchmarks/hashring.py
	$(BIN)/python benchmarks/chunked.py
	$(BIN)/python benchmarks/routing_decision.py
	$(BIN)/python benchmarks/text.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/media.py
	$(BIN)/python benchmarks/tools.py
	$(BIN)/python benchmarks/tool_loop.py
	$(BIN)/python benchmarks/tensors.py
	$(BIN)/python benchmarks/zmq_vs_http.py
	$(BIN)/python benchmarks/native_synth.py
	$(BIN)/python benchmarks/sdk.py
	$(BIN)/python benchmarks/loadgen.py
	$(BIN)/python benchmarks/security.py
	$(BIN)/python benchmarks/cachepool.py
	$(BIN)/python benchmarks/fairness.py
	$(BIN)/python benchmarks/hedging.py
	$(BIN)/python benchmarks/lora_affinity.py
	$(BIN)/python benchmarks/model_routes.py
	$(BIN)/python benchmarks/structured_resume.py
	$(BIN)/python benchmarks/placement.py
	$(BIN)/python benchmarks/data_parallel.py
	$(BIN)/python benchmarks/local_prefill.py
	$(BIN)/python benchmarks/planner.py

lint: $(STAMP)
	$(BIN)/ruff check src simulators tests benchmarks examples
	$(BIN)/ruff format --check src simulators tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src simulators tests benchmarks examples
	$(BIN)/ruff check --fix src simulators tests benchmarks examples

clean:
	rm -rf $(VENV) build src/*.egg-info src/lmgw/_fast/*.so src/lmgw/_fast/*.c
