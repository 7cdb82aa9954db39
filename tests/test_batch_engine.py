"""A real-engine batch run: killed with SIGKILL mid-run, then resumed. Every
id ends up exactly once; a corrupt clip costs only its own result; a 75 s
recording is answered segment by segment, in order.

The run cannot finish before the kill: its last request's audio comes from a
HeldAudioServer, released only after the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    PAUSES,
    SCRIPT,
    HeldAudioServer,
    assert_each_id_once,
    run_cli,
    speech_like,
    start,
    tone,
    wait_for_lines,
    whole_records,
)
from reference import transformers_greedy_ids

pytestmark = pytest.mark.engine


def make_batch(folder, held: HeldAudioServer) -> tuple[list[str], str]:
    """20 clips, a corrupt file, a 75 s recording, and, right after r02 (the
    tool answers in id order), a request whose audio the server holds until
    released."""
    lines = []
    for i in range(20):
        soundfile.write(folder / f"clip{i:02d}.wav", tone(1 + i % 3, 16000, 200 + 40 * i), 16000)
        lines.append({"id": f"r{i:02d}", "audio": f"clip{i:02d}.wav"})
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    lines.append({"id": "r10-corrupt", "audio": "corrupt.wav"})
    soundfile.write(folder / "long.wav", speech_like(75, PAUSES), 16000)
    lines.append({"id": "r11-long", "audio": "long.wav", "question": "Summarize."})
    lines.append({"id": "r02-held", "audio": held.url})
    (folder / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ids = [x["id"] for x in lines]
    return ids, str(folder / "jobs.jsonl")


def test_kill_resume_corrupt_clip_and_long_audio(tiny_model, tmp_path, home, vllm):
    """On both vLLM versions (the fixture vllm is each one's interpreter)."""
    with HeldAudioServer() as held:
        ids, manifest, written = kill_after_three_records(tiny_model, tmp_path, home, vllm, held)
        argv = batch_argv(vllm, tiny_model, manifest, tmp_path / "results.jsonl")
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
    records = assert_each_id_once(tmp_path / "results.jsonl", ids, kept=written)

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
    assert report["failed"] == 1 and report["skipped"] == len(written)
    assert report["ok"] == len(ids) - len(written) - 1
    assert np.isclose(
        report["real_time_factor"], report["audio_seconds"] / report["wall_seconds"], atol=0.01
    )


def batch_argv(vllm: str, model, manifest: str, out) -> list[str]:
    return [
        vllm,
        str(SCRIPT),
        "--model",
        str(model),
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
        # The held download waits as long as the test needs.
        "--url-timeout",
        "3600",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
    ]


def kill_after_three_records(
    tiny_model, tmp_path, home, vllm: str, held: HeldAudioServer
) -> tuple[list[str], str, list[dict]]:
    """The batch SIGKILLed once 3 records are in; then a torn line appended,
    as a kill inside a write leaves one. Returns the ids, the manifest and
    the whole records written before the kill.

    The kill lands at the same point on any machine: records are written in
    id order and "r02-held" cannot be answered before the server is released,
    after the kill, so the run holds exactly r00-r02 however fast it is (and
    the corrupt clip's record, further on, is always left to the resume)."""
    ids, manifest = make_batch(tmp_path, held)
    out = tmp_path / "results.jsonl"
    proc = start(batch_argv(vllm, tiny_model, manifest, out), home, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(proc, out, 3)
    finally:  # also when the wait fails: no run left behind on the machine
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = whole_records(out, torn_tail=True)
    assert [r["id"] for r in written] == ["r00", "r01", "r02"]
    with out.open("a") as f:
        f.write('{"id": "r19", "answ')  # what a kill inside a write leaves
    held.release()
    return ids, manifest, written
