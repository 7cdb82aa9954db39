"""The trained models' caches (tests/speech_model.py, and tests/build_cache.py
for tests/speech_model_qwen3_asr.py): one build per version of a builder,
shared by checkouts of several versions and parallel workers. The build
itself is replaced by one that writes a card: what is tested here is who may
remove what, and when."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import build_cache
import pytest
import speech_model
import speech_model_qwen3_asr

# Each builder and the name its builds carry in the cache.
BUILDERS = {"speech-model": speech_model, speech_model_qwen3_asr.NAME: speech_model_qwen3_asr}


@pytest.fixture
def builds() -> list[Path]:
    return []


@pytest.fixture(params=list(BUILDERS))
def builder(request):
    return request.param, BUILDERS[request.param]


@pytest.fixture
def cache(tmp_path, monkeypatch, builds) -> Path:
    """An empty cache root whose builds only write a card."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RQA_CACHE", str(root))
    for module in BUILDERS.values():

        def fake_build(directory: Path, module=module) -> Path:
            builds.append(directory)
            card = {"builder_hash": module.VERSION}
            (directory / "card.json").write_text(json.dumps(card))
            return directory

        monkeypatch.setattr(module, "build", fake_build)
    root.mkdir()
    return root


def other_version(root: Path, name: str = "speech-model") -> Path:
    build = root / f"{name}-000000000000"
    build.mkdir()
    (build / "card.json").write_text(json.dumps({"builder_hash": "000000000000"}))
    (root / f"{build.name}.lock").touch()
    return build


def test_an_install_removes_unused_other_versions_and_keeps_every_lock_file(
    cache, builder, tmp_path
):
    name, module = builder
    old = other_version(cache, name)
    copy = module.install(tmp_path / "copy")
    assert (copy / "card.json").is_file()
    assert not old.exists()
    # Unlinking a lock another process waits on would let a third make a new
    # one and hold "the same" lock beside it.
    assert (cache / f"{old.name}.lock").exists()


def test_a_version_in_use_by_another_checkout_is_kept(cache, builder):
    name, module = builder
    old = other_version(cache, name)
    with open(cache / f"{old.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # another checkout copying it
        module.install(cache.parent / "copy")
    assert (old / "card.json").is_file()


def test_one_builders_cleanup_never_removes_the_others_builds(cache, tmp_path):
    """The names share words ("speech-model"): a cleanup that matched the
    other's would throw away a 15-30 minute build."""
    first = speech_model.install(tmp_path / "first")
    second = speech_model_qwen3_asr.install(tmp_path / "second")
    speech_model.install(tmp_path / "first-again")
    assert (cache / f"speech-model-{speech_model.VERSION}").is_dir()
    assert (cache / f"{speech_model_qwen3_asr.NAME}-{speech_model_qwen3_asr.VERSION}").is_dir()
    assert (first / "card.json").is_file() and (second / "card.json").is_file()


def cached_build_of(module):
    """Where the builder's install looks its build up: the one to stand in for."""
    return (module, "cached_build") if module is speech_model else (build_cache, "cached_build")


def test_install_builds_again_when_the_build_vanished_before_its_copy(
    cache, builder, builds, tmp_path, monkeypatch
):
    """Another version's build may remove this one between the build's lock
    and the copy's: install notices and builds it again."""
    _, module = builder
    owner, name = cached_build_of(module)
    real_cached_build = getattr(owner, name)
    calls = []

    def cached_build_then_removed(*args) -> Path:
        built = real_cached_build(*args)
        calls.append(built)
        if len(calls) == 1:  # as if another version's cleanup ran just now
            (built / "card.json").unlink()
        return built

    monkeypatch.setattr(owner, name, cached_build_then_removed)
    target = module.install(tmp_path / "copy")
    assert len(calls) == 2 and len(builds) == 2
    assert json.loads((target / "card.json").read_text())["builder_hash"] == module.VERSION


def test_install_gives_up_with_a_message_when_the_build_keeps_vanishing(
    cache, builder, builds, tmp_path, monkeypatch
):
    _, module = builder
    owner, name = cached_build_of(module)
    real_cached_build = getattr(owner, name)

    def always_removed(*args) -> Path:
        built = real_cached_build(*args)
        (built / "card.json").unlink()
        return built

    monkeypatch.setattr(owner, name, always_removed)
    with pytest.raises(RuntimeError, match="removed three times"):
        module.install(tmp_path / "copy")
    assert len(builds) == 3


def test_a_removal_killed_halfway_leaves_a_build_no_one_takes_for_complete(cache, monkeypatch):
    build = other_version(cache, speech_model_qwen3_asr.NAME)
    (build / "model.safetensors").write_bytes(b"weights")

    def killed(path, ignore_errors=False):  # rmtree's first file, then the kill
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(build_cache.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        build_cache.remove(build)
    assert not build_cache.is_complete(build, "000000000000")
