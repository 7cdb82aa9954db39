"""Shared fixtures: a tiny real Qwen2-Audio checkpoint, audio clips, and a
runner for the script as users run it (a subprocess, real vLLM on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_qwen2_audio.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import build_tiny_qwen2_audio  # noqa: E402

# CPU stand-ins for what the NPU image provides: no ModelScope package here,
# float32 so vLLM and transformers agree token for token (bf16 drifts), and a
# KV cache that fits one NUMA node of a CI machine. The engine core runs in
# the script's own process: each extra process re-imports vLLM (about 15 s on
# two cores), so an engine start takes 25 s instead of 60. Tests that need the
# process layout users get (tutorial defaults, SIGTERM) set it back to "1".
CPU_ENV = {
    "VLLM_USE_MODELSCOPE": "False",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
USER_PROCESS_LAYOUT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
CPU_ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]
os.environ.update(CPU_ENV)


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    out = np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1)
    return out.astype(np.float32)


def chirp(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (200 + 150 * t) * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Clips of several formats, rates and channel counts; whole seconds, so
    each is exactly 25 audio tokens per second."""
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "a.wav": (tone(3, 16000), 16000),
        "b.mp3": (chirp(5, 44100, channels=2), 44100),
        "c.flac": (tone(4, 22050, freq=660), 22050),
        "d.ogg": (chirp(2, 48000, channels=2), 48000),
    }
    for name, (samples, rate) in made.items():
        soundfile.write(folder / name, samples, rate)
    return {name: folder / name for name in made}


@pytest.fixture(scope="session")
def demo_assets_cache(tmp_path_factory) -> Path:
    """A VLLM_ASSETS_CACHE holding stand-ins for vLLM's two demo clips (no
    network here), so the tutorial's default path runs for real."""
    cache = tmp_path_factory.mktemp("vllm-assets")
    folder = cache / "vllm_public_assets"
    folder.mkdir()
    soundfile.write(folder / "mary_had_lamb.ogg", tone(4, 16000, 330), 16000)
    soundfile.write(folder / "winning_call.ogg", chirp(6, 22050, 2), 22050)
    return cache


def run_script(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The script exactly as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env={**os.environ, **CPU_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def load_json_output(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
