# OCD Serve — the two quickstart commands: `make run` and `make test`.
# Both create (or reuse) .venv and install what they need. torch is pinned to the CPU build
# (torch==2.13.0 is on this project's machines' disk); a bare `torch` would pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH ?= torch==2.13.0

.PHONY: run test lint train clean-venv espeak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,dev,cpu]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The main job on the embedded default: train the MNIST bundle if models/ has none (printing its
# evaluation table), then serve every bundle in models/ on :8000 (OCD_* settings apply).
run: $(STAMP)
	@if ls models/mnist/*/manifest.json >/dev/null 2>&1 && test -f reports/mnist/report.md; then \
		echo "models/mnist: $$(ls models/mnist | tr '\n' ' ')(trained; 'make train' retrains)"; \
		sed -n '/^| row/,/^$$/p' reports/mnist/report.md; \
	else $(BIN)/ocd train mnist; fi
	$(BIN)/ocd serve

train: $(STAMP)
	$(BIN)/ocd train mnist

# espeak-ng (Debian) synthesises the spoken-digit audio; installed here when we are root.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } || \
		{ echo "espeak-ng is missing: sudo apt-get install espeak-ng"; exit 1; }

# ruff: the linter and the formatter's check (pyproject.toml [tool.ruff]); `ruff format .` fixes the latter
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint espeak
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
