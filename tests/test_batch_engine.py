"""A real-engine batch run: killed with SIGKILL mid-run, then resumed. Every
id ends up exactly once; a corrupt clip costs only its own result; a 75 s
recording is answered segment by segment, in order."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile
from helpers import (
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    PAUSES,
    ROOT,
    SCRIPT,
    read_jsonl,
    run_cli,
    speech_like,
    tone,
    user_env,
)
from reference import transformers_greedy_ids

pytestmark = pytest.mark.engine


def make_batch(folder) -> tuple[list[str], str]:
    lines, ids = [], []
    for i in range(20):
        soundfile.write(folder / f"clip{i:02d}.wav", tone(1 + i % 3, 16000, 200 + 40 * i), 16000)
        lines.append({"id": f"r{i:02d}", "audio": f"clip{i:02d}.wav"})
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    lines.append({"id": "r10-corrupt", "audio": "corrupt.wav"})
    soundfile.write(folder / "long.wav", speech_like(75, PAUSES), 16000)
    lines.append({"id": "r11-long", "audio": "long.wav", "question": "Summarize."})
    (folder / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ids = [x["id"] for x in lines]
    return ids, str(folder / "jobs.jsonl")


def test_kill_resume_corrupt_clip_and_long_audio(tiny_model, tmp_path, home, vllm):
    """On both vLLM versions (the fixture vllm is each one's interpreter)."""
    ids, manifest = make_batch(tmp_path)
    out = tmp_path / "results.jsonl"
    argv = [
        vllm,
        str(SCRIPT),
        "--model",
        str(tiny_model),
        "--manifest",
        manifest,
        "--output",
        str(out),
        "--chunk-size",
        "2",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        *CPU_ENGINE_FLAGS,
    ]
    victim = subprocess.Popen(
        argv,
        env=user_env(home, IN_PROCESS_ENGINE),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and victim.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    written = out.read_text().count("\n")
    assert 3 <= written < len(ids), "the kill must land in the middle of the run"
    with out.open("a") as f:
        f.write('{"id": "r19", "answ')  # what a kill inside a write leaves

    resumed = run_cli(
        *argv[2:],
        "--resume",
        "--report",
        tmp_path / "report.json",
        home=home,
        env=IN_PROCESS_ENGINE,
        python=vllm,
    )
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # 1: some request failed
    records = read_jsonl(out)  # every line parses
    assert sorted(r["id"] for r in records) == sorted(ids)

    by_id = {r["id"]: r for r in records}
    assert by_id["r10-corrupt"]["error"]["type"] == "audio_decode_error"
    assert "corrupt.wav: cannot decode it as audio" in by_id["r10-corrupt"]["error"]["message"]
    assert all("answer" in r for k, r in by_id.items() if k != "r10-corrupt")

    long = by_id["r11-long"]
    assert [len(s["token_ids"][0]) for s in long["segments"]] == [24, 24, 24]
    starts = [s["start"] for s in long["segments"]]
    assert starts[0] == 0 and 27.0 <= starts[1] <= 27.8 and 54.0 <= starts[2] <= 54.6
    assert long["segments"][-1]["end"] == 75.0
    assert long["token_ids"][0] == [t for s in long["segments"] for t in s["token_ids"][0]]

    samples, _ = soundfile.read(tmp_path / "clip03.wav", dtype="float32")
    _, ref_ids = transformers_greedy_ids(tiny_model, by_id["r03"]["prompt"], [samples], 24)
    assert by_id["r03"]["token_ids"] == [ref_ids]

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == 1 and report["skipped"] == written
    assert report["ok"] == len(ids) - written - 1
    assert np.isclose(
        report["real_time_factor"], report["audio_seconds"] / report["wall_seconds"], atol=0.01
    )
