"""The air-gapped matrix: every combination users meet on clusters without
network, each run as `python run_qwen2_audio.py` (the tutorial's defaults:
two demo clips) in a fresh process, on vLLM 0.23 (the image's, with the
modelscope package, as the image has it) and 0.32 (without it, as on any
other machine).

    vLLM version x offline declared or not x VLLM_USE_MODELSCOPE True/False
    x model: local directory / hub id in the local cache / hub id not cached
    x vLLM's demo clips cached or not

Every cell either answers (exit 0, the answer alone on stdout) or exits 2
with one line naming the problem and the fix. Both hubs are pointed at a
loopback "black hole" that accepts connections and never answers, like a
firewall that drops traffic, and counts them: where offline is declared no
cell connects at all (so none can wait on the network); where it is not, the
hub probe gives up after a few seconds. The demo clips are looked up after
the model and independently of it, so their absence is crossed with the
local directory only; cells that would decide nothing another cell does not
are left out (same_run_as_a_kept_cell).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    VLLM_PYTHONS,
    cache_in_hugging_face_hub,
    cache_in_modelscope,
    first_vllm_run,
    run_cli,
    vllm_python,
    write_demo_assets,
)

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine

HUB_ID = "tiny-org/tiny-qwen2-audio"  # stands for Qwen/Qwen2-Audio-7B-Instruct in a cache
UNCACHED = tool.DEFAULT_MODEL

OFFLINE = {
    "online": {},
    "HF_HUB_OFFLINE": {"HF_HUB_OFFLINE": "1"},
    "TRANSFORMERS_OFFLINE": {"TRANSFORMERS_OFFLINE": "1"},
}
HUB = {"modelscope": "True", "hf": "False"}
MODELS = ("local-dir", "cached-hub-id", "uncached-hub-id")
ASSETS = ("assets-cached", "assets-missing")

# An uncached model with nothing declared: the probe's few seconds plus
# start-up, never the minutes of retries the hub libraries would spend.
PROBE_SLACK_SECONDS = 30


_HAS_MODELSCOPE: dict[str, bool] = {}


def has_modelscope(python: str) -> bool:
    if python not in _HAS_MODELSCOPE:
        probe = "import importlib.util as u, sys; sys.exit(u.find_spec('modelscope') is None)"
        _HAS_MODELSCOPE[python] = subprocess.run([python, "-c", probe]).returncode == 0
    return _HAS_MODELSCOPE[python]


def same_run_as_a_kept_cell(version: str, offline: str, hub: str, model: str, assets: str) -> bool:
    """Cells left out, each deciding nothing a kept cell does not: the demo
    clips are looked up only once the model is found, and then by the offline
    setting and their own cache alone (so missing ones are crossed with the
    local directory only); and where the interpreter has no modelscope
    package the script turns VLLM_USE_MODELSCOPE=True off for a local
    directory before anything reads it: the hf cell's run, byte for byte."""
    if assets == "assets-missing" and model != "local-dir":
        return True
    python = VLLM_PYTHONS[version]
    # An interpreter that cannot run keeps its cells: they fail when run.
    runnable = Path(python).is_file() and os.access(python, os.X_OK)
    no_modelscope = runnable and not has_modelscope(python)
    return hub == "modelscope" and model == "local-dir" and no_modelscope


CELLS = [
    cell
    for cell in itertools.product(VLLM_PYTHONS, ("online", "HF_HUB_OFFLINE"), HUB, MODELS, ASSETS)
    if not same_run_as_a_kept_cell(*cell)
]
# TRANSFORMERS_OFFLINE means the same to the hub library; checked where it decides.
CELLS += list(
    itertools.product(
        VLLM_PYTHONS, ("TRANSFORMERS_OFFLINE",), HUB, ("uncached-hub-id",), ("assets-cached",)
    )
)


def expected(python: str, hub: str, model: str, assets: str) -> str:
    """The outcome a cell must have: "answer", or a piece of its one error line."""
    if hub == "modelscope" and model != "local-dir" and not has_modelscope(python):
        return "VLLM_USE_MODELSCOPE=True but the modelscope package is not installed"
    if model == "uncached-hub-id":
        cache = "ModelScope" if hub == "modelscope" else "Hugging Face"
        return f"--model {UNCACHED}: not in the local {cache} cache"
    if assets == "assets-missing":
        return "demo clip 'mary_had_lamb'"
    return "answer"


class BlackHole:
    """A loopback port that accepts connections, never answers, and counts them."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self.swallow, daemon=True).start()

    def swallow(self) -> None:
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                return

    @property
    def connections(self) -> int:
        return len(self.held)


@pytest.fixture(scope="module")
def black_hole():
    hole = BlackHole()
    yield hole
    hole.server.close()


def cell_id(cell) -> str:
    return "-".join(cell)


@pytest.mark.parametrize("version, offline, hub, model, assets", CELLS, ids=map(cell_id, CELLS))
def test_cell(version, offline, hub, model, assets, tiny_model, home, black_hole):
    python = vllm_python(version)
    if assets == "assets-cached":
        write_demo_assets(home / ".cache/vllm/assets")
    if model == "cached-hub-id":
        cache_in_hugging_face_hub(tiny_model, home, HUB_ID)
        cache_in_modelscope(tiny_model, home, HUB_ID)
    model_argument = {"local-dir": tiny_model, "cached-hub-id": HUB_ID}.get(model, UNCACHED)
    env = {
        **OFFLINE[offline],
        "VLLM_USE_MODELSCOPE": HUB[hub],
        "HF_ENDPOINT": f"http://127.0.0.1:{black_hole.port}",
        "MODELSCOPE_DOMAIN": f"127.0.0.1:{black_hole.port}",
        **IN_PROCESS_ENGINE,
        **first_vllm_run(home),  # each cell a new user's first run
    }
    connections_before = black_hole.connections
    result = run_cli(
        "--model",
        model_argument,
        "--max-tokens",
        "4",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env=env,
        python=python,
    )
    outcome = expected(python, hub, model, assets)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if offline != "online":
        assert black_hole.connections == connections_before, "offline, yet the hub was asked"
    if outcome == "answer":
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("\n") == 1 and result.stdout.strip()
        return
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and outcome in ours[0], result.stderr[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == ours[0]


def test_the_hub_probe_gives_up_quickly_when_offline_is_not_declared(home, black_hole):
    """An uncached model, a hub that never answers, nothing declared: one
    line after the probe's few seconds, not minutes of retries."""
    started = time.monotonic()
    result = run_cli(
        home=home,
        env={"VLLM_USE_MODELSCOPE": "False", "HF_ENDPOINT": f"http://127.0.0.1:{black_hole.port}"},
    )
    seconds = time.monotonic() - started
    assert result.returncode == 2
    assert f"http://127.0.0.1:{black_hole.port} cannot be reached (timed out)" in result.stderr
    assert tool.HUB_PROBE_SECONDS <= seconds < tool.HUB_PROBE_SECONDS + PROBE_SLACK_SECONDS
