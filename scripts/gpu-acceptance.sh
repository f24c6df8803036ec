#!/usr/bin/env bash
# The GPU acceptance run (benchmarks/gpu_acceptance.py): vLLM rollouts with adapter sync, GRPO
# training steps, the reward pool on CUDA with triton.speed, and the serving engine with each
# speculator, on models built in code (no model hub); every figure goes to one JSON file.
#
#   scripts/gpu-acceptance.sh [--output gpu-acceptance.json]   # one NVIDIA GPU, at most 8 minutes
#   scripts/gpu-acceptance.sh --device cpu --small              # the CPU run (a few minutes)
#   scripts/gpu-acceptance.sh --help                            # every option
#
# Exit status: 0 when every part passed, 1 when one failed (or, on the GPU, was skipped for a
# missing package), 2 when no GPU is usable in GPU mode. The children's output goes beside the
# JSON file, as .log.
#
# What the GPU machine needs installed beforehand (nothing is downloaded while it runs):
#   - an NVIDIA driver and a CUDA build of torch (checked first: without torch.cuda it stops);
#   - vLLM beside the kuberft trainer, reward and serve extras, in one virtualenv; vLLM pins its
#     own torch, so install it first and hold that torch when adding kuberft:
#         python3 -m venv .venv && . .venv/bin/activate        # or any virtualenv (then PYTHON=...)
#         pip install vllm
#         pip freeze | grep '^torch==' > /tmp/torch-pin.txt
#         pip install -c /tmp/torch-pin.txt -e '.[trainer,reward,serve]'
#     (triton comes with torch; the reward pool's sandbox needs Linux user namespaces).
# The interpreter: $PYTHON if set; else the first of .venv, python3 on the PATH and .venv-vllm
# (vLLM's CPU build, which `make test` installs: last) that has vLLM; else .venv; else python3.
# A part whose packages are missing is recorded as skipped.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

has_vllm() {
  [[ -x "$1" ]] && "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' 2>/dev/null
}

python=${PYTHON:-}
if [[ -z "$python" ]]; then
  for candidate in "$repo/.venv/bin/python" "$(command -v python3 || true)" "$repo/.venv-vllm/bin/python"; do
    if has_vllm "$candidate"; then
      python=$candidate
      break
    fi
  done
fi
if [[ -z "$python" ]]; then
  python=$repo/.venv/bin/python
  [[ -x "$python" ]] || python=python3
fi

# Everything is built in code: nothing may try the network (hub look-ups, vLLM's usage report).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
echo "gpu-acceptance: $python" >&2
exec "$python" "$repo/benchmarks/gpu_acceptance.py" "$@"
