#!/usr/bin/env bash
# Builds, with podman, the images the container tests run (tests/run.sh calls
# this; it can also be run alone):
#   localhost/debian-python:bookworm        Debian's rootfs with Python 3 (debootstrap)
#   localhost/vllm-ascend-standin:v0.23.0   + vLLM 0.23.0 for CPU: tests/container/standin.Containerfile
#   localhost/run-qwen2-audio:test          the project's Dockerfile on that stand-in,
#                                           also tagged run-qwen2-audio as the README builds it
# Each image carries a hash of its inputs and is rebuilt only when they
# change (the stand-in is ~7 GB; the project image reuses podman's layer
# cache, so a changed script costs seconds). Installs podman, runc and
# debootstrap with apt-get where missing (root).
# Prints one line on stdout, CONTAINERS_CONF=/abs/path: podman here needs that
# configuration; export it to run podman by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RQA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/run_qwen2_audio}"
DIR="$CACHE/containers"
mkdir -p "$DIR"

OS_IMAGE=localhost/debian-python:bookworm
STANDIN=localhost/vllm-ascend-standin:v0.23.0
IMAGE=localhost/run-qwen2-audio:test
# vLLM on CPU needs libnuma and a C++ compiler (torch inductor), as the real
# image has them (its Dockerfile installs gcc, g++ and libnuma-dev).
OS_PACKAGES=python3,python3-venv,python3-dev,ca-certificates,g++,libnuma1
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

if ! command -v podman > /dev/null || ! command -v runc > /dev/null ||
  ! command -v debootstrap > /dev/null; then
  echo "installing podman, runc and debootstrap (apt-get, once)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    podman runc debootstrap; } > "$DIR/apt.log" 2>&1 || { tail -n 30 "$DIR/apt.log" >&2; exit 1; }
fi

# The runtime cannot raise resource limits here (no CAP_SYS_RESOURCE), so
# containers get the limits this shell already has; crun rejects the hybrid
# cgroup layout of these machines, runc does not.
CONTAINERS_CONF="$DIR/containers.conf"
cat > "$CONTAINERS_CONF" << EOF
[containers]
default_ulimits = ["nofile=$(ulimit -n):$(ulimit -n)", "nproc=$(cat /proc/sys/kernel/pid_max):$(cat /proc/sys/kernel/pid_max)"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF

# inputs_of IMAGE: the hash its last build was made from ("" if none).
inputs_of() {
  podman image inspect --format '{{index .Labels "rqa.inputs"}}' "$1" 2> /dev/null || true
}

# build_image LOG ARGS...: podman build, trusting the host's CA bundle where
# HTTPS is re-signed by a proxy.
build_image() {
  local log=$1 started=$SECONDS
  shift
  local mounts=()
  [ -f "$CA_BUNDLE" ] && mounts=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
  podman build "${mounts[@]}" "$@" > "$log" 2>&1 ||
    { tail -n 40 "$log" >&2; return 1; }
  echo "built in $((SECONDS - started)) s (log: $log)" >&2
}

# 1. Debian with Python 3, from the host's Debian mirror.
os_inputs=$(echo "bookworm $OS_PACKAGES" | sha256sum | cut -c1-12)
if [ "$(inputs_of "$OS_IMAGE")" != "$os_inputs" ]; then
  echo "building $OS_IMAGE (debootstrap, once)" >&2
  mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2> /dev/null | head -n 1)
  rootfs="$DIR/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$OS_PACKAGES" bookworm "$rootfs" \
    "${mirror:-http://deb.debian.org/debian}" > "$DIR/debootstrap.log" 2>&1 ||
    { tail -n 30 "$DIR/debootstrap.log" >&2; exit 1; }
  tar -C "$rootfs" -c . | podman import --change "LABEL rqa.inputs=$os_inputs" - "$OS_IMAGE" \
    > "$DIR/import.log" 2>&1 || { tail -n 30 "$DIR/import.log" >&2; exit 1; }
  rm -rf "$rootfs"
fi

# 2. The stand-in for quay.io/ascend/vllm-ascend:v0.23.0.
standin_inputs=$(cat tests/container/standin.Containerfile tests/requirements-vllm023.txt |
  { cat; echo "$os_inputs"; } | sha256sum | cut -c1-12)
if [ "$(inputs_of "$STANDIN")" != "$standin_inputs" ]; then
  echo "building $STANDIN (downloads vLLM 0.23.0 and torch, ~7 GB; once)" >&2
  context=$(mktemp -d)
  cp tests/container/standin.Containerfile tests/requirements-vllm023.txt "$context/"
  # --format docker: its RUN needs the SHELL line (bash, pipefail).
  build_image "$DIR/build-standin.log" --format docker -f "$context/standin.Containerfile" \
    --build-arg OS_IMAGE="$OS_IMAGE" --label rqa.inputs="$standin_inputs" -t "$STANDIN" "$context"
  rm -rf "$context"
fi

# 3. The project's image, built as the README says (podman's default format:
# SHELL ignored, RUN in sh), on the stand-in.
image_inputs=$(cat Dockerfile .dockerignore requirements.txt run_qwen2_audio.py |
  { cat; podman image inspect --format '{{.Id}}' "$STANDIN"; } | sha256sum | cut -c1-12)
if [ "$(inputs_of "$IMAGE")" != "$image_inputs" ]; then
  echo "building $IMAGE" >&2
  build_image "$DIR/build-image.log" --build-arg BASE_IMAGE="$STANDIN" \
    --label rqa.inputs="$image_inputs" -t "$IMAGE" .
fi
# The name the README's commands use (podman resolves it to localhost/).
podman tag "$IMAGE" run-qwen2-audio
podman image prune -f > /dev/null # images these builds replaced

echo "CONTAINERS_CONF=$CONTAINERS_CONF"
