"""The answer guard (Whisper's): every answer is measured (compression ratio,
mean token log-probability); one that trips a threshold is asked again at each
fallback temperature in turn, and flagged "suspect" if none passes. Random
weights guess every token, so the thresholds here are set where every answer
trips: what the guard does then is fixed, whatever the random text is. The
speech-trained model's side (no false alarms, silence not sent) is in
test_hearing.py."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import soundfile
from helpers import (
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    SCRIPT,
    assert_each_id_once,
    chirp,
    read_jsonl,
    run_cli,
    start,
    tone,
    wait_for_lines,
    whole_records,
)

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine
RATE = 16000
# The tutorial's temperature, then Whisper's steps above it.
TEMPERATURES = [0.2, 0.4, 0.6, 0.8, 1.0]
# A threshold under every compression ratio (an empty answer's is 0): every
# answer trips as "repetition", whatever random weights say.
EVERY_TEXT_REPEATS = ["--compression-ratio-threshold", "-1", "--logprob-threshold", "none"]


def write_batch(folder: Path, long_seconds: int = 12) -> list[str]:
    """Three short clips and a long recording split at 5 s into segments."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {"a.wav": tone(3, RATE), "b.wav": chirp(2, RATE), "long.wav": chirp(long_seconds, RATE)}
    made["c.wav"] = tone(4, RATE, freq=660)
    for name, samples in made.items():
        soundfile.write(folder / name, samples, RATE)
    lines = [{"id": Path(n).stem, "audio": str(folder / n)} for n in sorted(made)]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return [x["id"] for x in lines]


def parts(record: dict) -> list[dict]:
    """A record's answers with their measures: its segments, or itself."""
    return record.get("segments", [record])


def test_an_answer_that_trips_is_asked_at_every_fallback_temperature_and_flagged(
    vllm, tiny_model, tmp_path, home
):
    ids = write_batch(tmp_path)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = run_cli(
        "--model", tiny_model, "--manifest", tmp_path / "jobs.jsonl", "--output", out,
        "--report", report, "--segment-seconds", "5", "--max-tokens", "8", "--no-progress",
        *EVERY_TEXT_REPEATS, *CPU_ENGINE_FLAGS,
        home=home, python=vllm, env=IN_PROCESS_ENGINE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(records) == sorted(ids)
    assert len(records["long"]["segments"]) == 3
    for record in records.values():
        for part in parts(record):
            assert part["compression_ratio"] >= 0
            assert part["mean_logprob"] is None  # not asked for: its threshold is off
            assert part["fallbacks"] == len(TEMPERATURES) - 1
            assert part["suspect"] == ["repetition"]
            # All as bad as each other: the first attempt is kept.
            assert part["temperature"] == TEMPERATURES[0]
        assert record["fallbacks"] == sum(p["fallbacks"] for p in parts(record))
        assert record["suspect"] == ["repetition"]
        assert any("suspect answer" in w for w in record["warnings"]), record["warnings"]
    summary = json.loads(report.read_text())
    assert summary["asked_again"] == summary["suspect"] == len(records)
    assert summary["fallbacks"] == sum(r["fallbacks"] for r in records.values()) == 6 * 4
    assert (
        f"guard: {len(records)} request(s) asked again (24 more attempt(s)), "
        f"{len(records)} suspect; 0 silent segment(s) not sent"
    ) in result.stderr
    assert f"warning: {len(records)} request(s) with a suspect answer after every attempt" in (
        result.stderr
    )


def test_with_fallback_none_nothing_is_asked_again_but_every_answer_is_measured(
    tiny_model, tmp_path, home
):
    write_batch(tmp_path)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = run_cli(
        "--model", tiny_model, "--manifest", tmp_path / "jobs.jsonl", "--output", out,
        "--report", report, "--segment-seconds", "5", "--max-tokens", "16", "--no-progress",
        "--temperature-fallback", "none", *CPU_ENGINE_FLAGS,
        home=home, env=IN_PROCESS_ENGINE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out)
    flagged = 0
    for record in records:
        for part in parts(record):
            # Whisper's measures of the very text and tokens recorded.
            assert part["compression_ratio"] == round(tool.compression_ratio(part["answers"][0]), 3)
            assert part["mean_logprob"] < 0
            assert part["fallbacks"] == 0 and part["temperature"] == 0.2
            expected = [
                reason
                for reason, tripped in (
                    ("repetition", part["compression_ratio"] > 2.4),
                    ("low_logprob", part["mean_logprob"] < -1.0),
                )
                if tripped
            ]
            assert part.get("suspect", []) == expected
        flagged += "suspect" in record
    # Random weights guess: their answers are unlikely (measured about -1.8).
    assert flagged > 0
    summary = json.loads(report.read_text())
    assert summary["asked_again"] == summary["fallbacks"] == 0
    assert summary["suspect"] == flagged


def test_a_sigkill_during_fallbacks_then_resume_loses_and_doubles_nothing(
    tiny_model, tmp_path, home
):
    """a-short is one clip, b-long some 14 segments, two prompts in the engine
    at a time (--chunk-size 2), every attempt tripping: when a-short's record
    is written (after its five attempts, while b-long's first segment went
    through its own), b-long has some 65 attempts to go. The kill lands then;
    the test checks that it did (b-long is not written)."""
    folder = tmp_path / "in"
    folder.mkdir()
    soundfile.write(folder / "short.wav", tone(3, RATE), RATE)
    soundfile.write(folder / "long.wav", chirp(60, RATE), RATE)
    lines = [{"id": "a-short", "audio": "short.wav"}, {"id": "b-long", "audio": "long.wav"}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    argv = [
        sys.executable, str(SCRIPT), "--model", str(tiny_model),
        "--manifest", str(folder / "jobs.jsonl"), "--output", str(out), "--chunk-size", "2",
        "--segment-seconds", "5", "--max-tokens", "32", "--no-progress",
        *EVERY_TEXT_REPEATS, *CPU_ENGINE_FLAGS,
    ]  # fmt: skip
    proc = start(argv, home, stderr=(tmp_path / "killed.log").open("w"))
    try:
        wait_for_lines(proc, out, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = whole_records(out, torn_tail=True)
    assert [r["id"] for r in kept] == ["a-short"], "the kill came after b-long finished"
    assert kept[0]["fallbacks"] == 4

    resumed = run_cli(*argv[2:], "--resume", home=home, env=IN_PROCESS_ENGINE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = assert_each_id_once(out, ["a-short", "b-long"], kept)
    [long] = [r for r in records if r["id"] == "b-long"]
    assert len(long["segments"]) >= 12
    assert all(s["fallbacks"] == 4 and s["suspect"] == ["repetition"] for s in long["segments"])
    assert long["fallbacks"] == 4 * len(long["segments"])
