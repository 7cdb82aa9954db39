"""Fixtures: a tiny real Qwen2-Audio checkpoint, clips, the demo clips'
cache, a user's empty home, a disk that fills up, and the vLLM versions
under test. What tests
share besides fixtures is in helpers.py; nothing here changes the
environment the script runs in (helpers.run_cli builds it from nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

import speech_model as speech_builder  # noqa: E402
from helpers import VLLM_PYTHONS, chirp, tone, vllm_python, write_demo_assets  # noqa: E402
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
    """The speech-trained tiny checkpoint (cached; tests/run.sh builds it
    beside the other tests, and the tests that need it wait for that build)."""
    status = os.environ.get("RQA_SPEECH_BUILD_STATUS")
    if status:
        log = Path(os.environ.get("RQA_SPEECH_BUILD_LOG", "(unknown)"))
        wait_for_the_build(Path(status), int(os.environ.get("RQA_SPEECH_BUILD_PID", "0")), log)
        built = speech_builder.cache_root() / f"speech-model-{speech_builder.VERSION}"
        if not speech_builder.is_complete(built):  # never a second build in here
            pytest.fail(f"the speech model's build ended, yet {built} is not complete; log: {log}")
    return speech_builder.install(tmp_path_factory.mktemp("speech-model"))


def wait_for_the_build(status: Path, builder: int, log: Path) -> None:
    """Until tests/run.sh's build (process builder) writes its exit status; a
    failed build fails the tests that need it (naming its log) instead of
    starting another here."""
    while not status.is_file():
        if not running(builder):  # its status is there now, or never will be
            if not status.is_file():
                pytest.fail(f"the speech model's build ended without a status; log: {log}")
            break
        time.sleep(2)
    code = status.read_text().strip()
    if code != "0":
        pytest.fail(f"the speech model's build failed (exit {code}); log: {log}")


def running(pid: int) -> bool:
    """Whether process pid runs (a zombie, ended but not yet waited for, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone (ENOENT, or ESRCH when it is reaped while read)
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of the speech model last: run while it is being built, the
    others go first."""
    items.sort(key=lambda item: "speech_model" in getattr(item, "fixturenames", ()))


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
    """A user's home directory: empty, so every cache in it is cold."""
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
