"""A cache of trained test checkpoints: one build per version of its builder,
shared by checkouts of several versions and by parallel test workers.

A build lives in CACHE/NAME-VERSION, where VERSION hashes the builder's
source: an edit of the builder is a new build, and a checkout of the old one
still finds its own. tests/speech_model_qwen3_asr.py keeps its build here;
tests/speech_model.py holds the same rules in its own file, which moves here
when its recipe next changes (an edit of that file rebuilds both speech models
in every cache, CI's included: about 45 minutes on two cores).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where the project's test caches live (as tests/run.sh computes it)."""
    if os.environ.get("RQA_CACHE"):
        return Path(os.environ["RQA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "run_qwen2_audio"


def source_hash(*files: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def is_complete(directory: Path, version: str) -> bool:
    card = directory / "card.json"
    return card.is_file() and json.loads(card.read_text()).get("builder_hash") == version


def cached_build(name: str, version: str, build: Callable[[Path], Path]) -> Path:
    """CACHE/name-version, built first (by build(staging directory)) if missing."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{version}"
    with open(root / f"{final.name}.lock", "w") as lock:
        # One build at a time: a second caller (a parallel test worker) waits
        # here, then finds the finished build instead of starting its own.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(final, version):
            return final
        for leftover in root.glob(f"{final.name}.tmp-*"):  # from a killed build
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
        try:
            build(staging)
            remove(final)  # an incomplete copy, if any
            staging.rename(final)  # atomic: readers see all of it or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_other_versions(root: Path, name: str, version: str) -> None:
    """Builds of other versions, unless one is in use (a build or a copy holds
    its lock): a checkout of another version may still need it. Lock files
    stay (empty): one unlinked while another process waits on it would let a
    third create a new one and hold "the" lock beside it."""
    for lock_path in root.glob(f"{name}-*.lock"):
        other = lock_path.name.removesuffix(".lock")
        if other == f"{name}-{version}" or not re.fullmatch(
            r"[0-9a-f]{12}", other[len(name) + 1 :]
        ):
            continue  # this version's, or another name's that starts with name
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for path in [root / other, *root.glob(f"{other}.tmp-*")]:
                remove(path)


def remove(build: Path) -> None:
    """The card first: a removal killed halfway leaves a build that is_complete
    refuses (rmtree's order could leave the card and lose the weights)."""
    (build / "card.json").unlink(missing_ok=True)
    shutil.rmtree(build, ignore_errors=True)


def install(
    directory: Path, name: str, version: str, build: Callable[[Path], Path], log: Callable
) -> Path:
    """Put the checkpoint into directory (a copy of the cached build), then
    remove other versions' builds nobody uses."""
    started = time.monotonic()
    for _ in range(3):
        source = cached_build(name, version, build)
        with open(source.parent / f"{source.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # no other version's build removes it meanwhile
            # Between the build's lock and this one, another version's
            # cleanup may have found it unused and removed it: build again.
            if is_complete(source, version):
                directory.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source, directory, dirs_exist_ok=True)
                break
    else:
        raise RuntimeError(f"{source}: removed three times before it could be copied")
    remove_other_versions(source.parent, name, version)
    log(f"{directory}: checkpoint from {source} ({time.monotonic() - started:.1f} s)")
    return directory
