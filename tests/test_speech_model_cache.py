"""The speech model's cache (tests/speech_model.py): one build per version of
the builder, shared by checkouts of several versions and parallel workers.
The build itself is replaced by one that writes a card: what is tested here is
who may remove what, and when."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

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
