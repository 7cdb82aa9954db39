"""The speech model's cache (tests/speech_model.py): one build per version of
the builder, shared by checkouts of several versions and parallel workers.
The build itself is replaced by one that writes a card: what is tested here is
who may remove what, and when."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
from pathlib import Path

import conftest
import pytest
import speech_model


@pytest.fixture
def builds() -> list[Path]:
    return []


@pytest.fixture
def cache(tmp_path, monkeypatch, builds) -> Path:
    """An empty cache root whose builds only write a card."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RQA_CACHE", str(root))

    def fake_build(directory: Path) -> Path:
        builds.append(directory)
        card = {"builder_hash": speech_model.VERSION}
        (directory / "card.json").write_text(json.dumps(card))
        return directory

    monkeypatch.setattr(speech_model, "build", fake_build)
    root.mkdir()
    return root


def other_version(root: Path, name: str = "speech-model-000000000000") -> Path:
    build = root / name
    build.mkdir()
    (build / "card.json").write_text(json.dumps({"builder_hash": name[-12:]}))
    (root / f"{name}.lock").touch()
    return build


def test_an_install_removes_unused_other_versions_and_keeps_every_lock_file(cache, tmp_path):
    old = other_version(cache)
    copy = speech_model.install(tmp_path / "copy")
    assert (copy / "card.json").is_file()
    assert not old.exists()
    # Unlinking a lock another process waits on would let a third make a new
    # one and hold "the same" lock beside it.
    assert (cache / f"{old.name}.lock").exists()


def test_a_version_in_use_by_another_checkout_is_kept(cache):
    old = other_version(cache)
    with open(cache / f"{old.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # another checkout copying it
        speech_model.install(cache.parent / "copy")
    assert (old / "card.json").is_file()


def test_install_builds_again_when_the_build_vanished_before_its_copy(
    cache, builds, tmp_path, monkeypatch
):
    """Another version's build may remove this one between the build's lock
    and the copy's: install notices and builds it again."""
    real_cached_build = speech_model.cached_build
    calls = []

    def cached_build_then_removed() -> Path:
        built = real_cached_build()
        calls.append(built)
        if len(calls) == 1:  # as if another version's cleanup ran just now
            (built / "card.json").unlink()
        return built

    monkeypatch.setattr(speech_model, "cached_build", cached_build_then_removed)
    target = speech_model.install(tmp_path / "copy")
    assert len(calls) == 2 and len(builds) == 2
    assert json.loads((target / "card.json").read_text())["builder_hash"] == speech_model.VERSION


def test_install_gives_up_with_a_message_when_the_build_keeps_vanishing(
    cache, builds, tmp_path, monkeypatch
):
    real_cached_build = speech_model.cached_build

    def always_removed() -> Path:
        built = real_cached_build()
        (built / "card.json").unlink()
        return built

    monkeypatch.setattr(speech_model, "cached_build", always_removed)
    with pytest.raises(RuntimeError, match="removed three times"):
        speech_model.install(tmp_path / "copy")
    assert len(builds) == 3


# tests/run.sh builds the model beside the other tests; the tests that need it
# wait for the build's exit status (conftest.wait_for_the_build).

LOG = Path("/runs/speech-model.log")


def test_the_tests_that_need_the_model_wait_for_the_build_to_end(tmp_path):
    status = tmp_path / "speech-model.status"
    # The builder writes its status (0) as run.sh does, once told to.
    write = 'read line; echo 0 > "$1.tmp" && mv "$1.tmp" "$1"'
    builder = subprocess.Popen(["sh", "-c", write, "_", str(status)], stdin=subprocess.PIPE)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            conftest.wait_for_the_build(status, builder.pid, LOG)
            outcome.append(None)
        except BaseException as exc:  # pytest.fail raises an OutcomeException
            outcome.append(exc)

    waiting = threading.Thread(target=wait)
    waiting.start()
    assert waiting.is_alive() and not status.exists()  # nothing can end it but the builder
    builder.communicate(b"go\n")
    waiting.join(timeout=120)  # a backstop against a hang, not a bound
    assert not waiting.is_alive() and outcome == [None]


def test_a_failed_build_fails_the_tests_that_need_it_naming_its_log(tmp_path):
    status = tmp_path / "speech-model.status"
    status.write_text("1\n")
    with pytest.raises(pytest.fail.Exception, match=r"build failed \(exit 1\); log: /runs/"):
        conftest.wait_for_the_build(status, os.getpid(), LOG)


def test_a_build_that_ends_without_a_status_fails_instead_of_waiting_for_ever(tmp_path):
    builder = subprocess.Popen(["true"])
    builder.wait()
    with pytest.raises(pytest.fail.Exception, match="ended without a status; log: /runs/"):
        conftest.wait_for_the_build(tmp_path / "speech-model.status", builder.pid, LOG)
