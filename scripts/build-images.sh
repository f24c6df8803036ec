#!/usr/bin/env bash
# Builds the container images the Helm chart deploys, tagged <registry>/<name>:<tag> as it expects
# (operator, trainer, reward, serve), from the repository root as build context, then prints
# their sizes. `make images` runs it.
#
# Usage: scripts/build-images.sh [--local-base] [NAME...]        (default: all four)
#   --local-base  build on a Debian 12 base made here with mmdebstrap (cached under
#                 $KUBERFT_CACHE/images) instead of pulling the CUDA, Debian and distroless bases:
#                 no registry is needed, only PyPI and a Debian mirror; what the slow image test
#                 does. Torch then comes from PyPI alone (with its CUDA wheels).
# Environment:
#   IMAGE_REGISTRY  default ghcr.io/kuberft;  IMAGE_TAG  default: the version in pyproject.toml
#   DOCKER          the engine: docker or podman (default: docker if its daemon answers, else podman)
#   BUILD_ISOLATION podman's --isolation (default chroot: works without cgroups or a container
#                   runtime, as on a CI machine or inside a container; the Dockerfiles are ours)
#   SSL_CERT_FILE   with --local-base and podman: a CA bundle the network needs, bind-mounted over
#                   the base's own bundle while RUN steps run, never copied into an image
#   BUILD_ARGS      extra arguments for every `build` (e.g. "--no-cache")
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

declare -A DOCKERFILES=(
  [operator]=operator/Dockerfile
  [trainer]=trainer_image/Dockerfile
  [reward]=reward_image/Dockerfile
  [serve]=serve_image/Dockerfile
)
ORDER=(operator trainer reward serve)
# The local base: Debian 12 with Python 3.11, like the distroless runtime (which the operator and
# reward images run on) and debian:12-slim; the Dockerfiles install the rest with apt.
BASE_SUITE=bookworm
BASE_PACKAGES=python3,ca-certificates

say() { echo "build-images: $*" >&2; }

local_base=false
names=()
for arg in "$@"; do
  case "$arg" in
    --local-base) local_base=true ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) say "unknown option '$arg'"; exit 2 ;;
    *)
      [[ -n "${DOCKERFILES[$arg]:-}" ]] || { say "unknown image '$arg' (known: ${ORDER[*]})"; exit 2; }
      names+=("$arg") ;;
  esac
done
[[ ${#names[@]} -gt 0 ]] || names=("${ORDER[@]}")

registry=${IMAGE_REGISTRY:-ghcr.io/kuberft}
tag=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
[[ -n "$tag" ]] || { say "no IMAGE_TAG and no version in pyproject.toml"; exit 1; }

engine=${DOCKER:-}
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null; then
    engine=podman
  else
    say "no container engine: start Docker, or install podman (scripts/install-tools.sh images)"
    exit 1
  fi
fi
"$engine" info >/dev/null 2>&1 || { say "no container engine answers '$engine info'; start Docker or set DOCKER=podman"; exit 1; }
for name in "${names[@]}"; do
  [[ -f "${DOCKERFILES[$name]}" ]] || { say "${DOCKERFILES[$name]} is missing (image $name)"; exit 1; }
done

flags=()
if [[ "$(basename "$engine")" == podman* ]]; then
  # The docker format keeps HEALTHCHECK (OCI has no such field).
  flags+=(--isolation "${BUILD_ISOLATION:-chroot}" --format docker)
fi
# shellcheck disable=SC2206  # BUILD_ARGS is a list of words on purpose
flags+=(${BUILD_ARGS:-})

if $local_base; then
  cache=${KUBERFT_CACHE:-$HOME/.cache/kuberft}/images
  mkdir -p "$cache"
  key=$(printf '%s %s' "$BASE_SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
  base="localhost/kuberft-base:$BASE_SUITE-$key"
  rootfs="$cache/debian-$BASE_SUITE-$key.tar"
  if [[ ! -s "$rootfs" ]]; then
    command -v mmdebstrap >/dev/null || { say "--local-base needs mmdebstrap (scripts/install-tools.sh images)"; exit 1; }
    say "making the Debian $BASE_SUITE base with mmdebstrap (once, ~1 minute): $rootfs"
    mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs.partial"
    mv "$rootfs.partial" "$rootfs"
  fi
  if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
    "$engine" import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$rootfs" "$base" >/dev/null
  fi
  say "base $base"
  flags+=(--build-arg "BASE_IMAGE=$base" --build-arg "BUILD_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base"
          --build-arg "GPU_IMAGE=$base" --build-arg "TORCH_INDEX_URL=")
  if [[ -n "${SSL_CERT_FILE:-}" && -f "$SSL_CERT_FILE" && "$(basename "$engine")" == podman* ]]; then
    flags+=(--volume "$(readlink -f "$SSL_CERT_FILE"):/etc/ssl/certs/ca-certificates.crt:ro")
  fi
fi

for name in "${names[@]}"; do
  image="$registry/$name:$tag"
  say "$image from ${DOCKERFILES[$name]}"
  start=$SECONDS
  "$engine" build "${flags[@]}" -f "${DOCKERFILES[$name]}" -t "$image" .
  say "$image built in $((SECONDS - start)) s"
done

for name in "${names[@]}"; do
  image="$registry/$name:$tag"
  size=$("$engine" image inspect --format '{{.Size}}' "$image" 2>/dev/null || true)
  [[ "$size" =~ ^[0-9]+$ ]] || size=0
  printf 'build-images: %-44s %6d MB\n' "$image" "$((size / 1000000))" >&2
done
