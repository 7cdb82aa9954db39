"""Fixtures: a tiny real Qwen2-Audio checkpoint, clips, the demo clips'
cache, a user's empty home, a disk that fills up, and the vLLM versions
under test; and the order tests are handed out in. What tests
share besides fixtures is in helpers.py; nothing here changes the
environment the script runs in (helpers.run_cli builds it from nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from helpers import VLLM_PYTHONS, chirp, tone, vllm_python, write_demo_assets  # noqa: E402
from speech_model import install as install_speech_model  # noqa: E402
from speech_model_qwen3_asr import install as install_qwen3_asr_speech_model  # noqa: E402
from tiny_model import build_tiny_qwen2_audio  # noqa: E402
from tiny_qwen3_asr import build_tiny_qwen3_asr  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Random weights, a small vocabulary: for every test that does not count
    or compare prompts as the real model does (it starts some 25 s faster)."""
    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="session")
def real_vocabulary_model(tmp_path_factory) -> Path:
    """Random weights, the real Qwen2 vocabulary at its published ids."""
    folder = tmp_path_factory.mktemp("tiny-qwen2-audio-real-vocabulary")
    return build_tiny_qwen2_audio(folder, real_vocabulary=True)


@pytest.fixture(scope="session")
def qwen3_asr_model(tmp_path_factory) -> Path:
    """A tiny Qwen3-ASR in its published layout, random weights."""
    return build_tiny_qwen3_asr(tmp_path_factory.mktemp("tiny-qwen3-asr"))


@pytest.fixture(scope="session")
def speech_model(tmp_path_factory) -> Path:
    """The speech-trained tiny checkpoint (built by tests/run.sh first, cached)."""
    return install_speech_model(tmp_path_factory.mktemp("speech-model"))


@pytest.fixture(scope="session")
def qwen3_asr_speech_model(tmp_path_factory) -> Path:
    """The speech-trained tiny Qwen3-ASR, in its published layout (built by
    tests/run.sh first, cached)."""
    return install_qwen3_asr_speech_model(tmp_path_factory.mktemp("qwen3-asr-speech-model"))


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
    return write_demo_assets(tmp_path_factory.mktemp("vllm-assets"))


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's home directory: empty, so every cache in it is cold (vLLM's
    own cache is kept outside it, as after a first run: helpers.user_env)."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs: a real disk that fills up (ENOSPC)."""
    mount_point = tmp_path / "tiny-fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    assert mounted.returncode == 0, (
        "the disk-full test mounts a 64 KiB tmpfs and needs root: " + mounted.stderr.decode()
    )
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(params=list(VLLM_PYTHONS))
def vllm(request) -> str:
    """The interpreter of each vLLM version under test (0.23: the image's)."""
    return vllm_python(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first: xdist hands tests to its workers in this order
    (after its groups of several tests, the Slurm ones), and a long test handed
    out last keeps one worker busy while the other has nothing left. The speech
    model's runs hold hundreds of requests each, so they go first, then every
    test that starts an engine; the quick ones fill the end."""

    def rank(item: pytest.Item) -> int:
        if item.path.name.startswith("test_hearing"):
            return 0
        return 1 if item.get_closest_marker("engine") else 2

    items.sort(key=rank)  # stable: collection order within each rank
