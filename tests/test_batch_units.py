"""Batch inputs, sharding, resume bookkeeping, long-audio splitting and the
memory estimate, without the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

import run_qwen2_audio as tool


def write_manifest(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_good_and_bad_lines(tmp_path):
    manifest = write_manifest(
        tmp_path / "jobs.jsonl",
        [
            json.dumps({"id": "b", "audio": "clips/b.wav", "question": "Q?"}),
            json.dumps({"id": "a", "audio": ["/x/1.wav", "https://h/2.mp3"]}),
            "{not json",
            json.dumps({"id": "c", "audio": "c.wav", "speaker": "x"}),
            json.dumps({"id": "d", "audio": 5}),
            json.dumps({"id": "e"}),
            json.dumps({"id": "a", "audio": "dup.wav"}),
            json.dumps({"id": "f", "audio": "file:///etc/passwd"}),
            "",
        ],
    )
    requests = {r.id: r for r in tool.read_manifest(manifest)}
    assert requests["b"].audio == [str(tmp_path / "clips/b.wav")]
    assert requests["b"].question == "Q?"
    assert requests["a"].audio == ["/x/1.wav", "https://h/2.mp3"]
    errors = {k: str(r.error) for k, r in requests.items() if r.error}
    assert "line 3: not valid JSON" in errors["jobs.jsonl:3"]
    assert "line 4: unknown key(s) speaker" in errors["jobs.jsonl:4"]
    assert '"audio" must be' in errors["jobs.jsonl:5"]
    assert '"audio" must be' in errors["jobs.jsonl:6"]
    assert "duplicate id 'a'" in errors["jobs.jsonl:7"]
    assert "scheme file:// is not supported" in errors["jobs.jsonl:8"]
    assert list(requests) == sorted(requests)


def test_audio_dir_is_scanned_sorted(tmp_path):
    for name in ["z.wav", "sub/a.flac", "sub/notes.txt", "m.mp3"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ids = [r.id for r in tool.scan_audio_dir(tmp_path)]
    assert ids == ["m.mp3", "sub/a.flac", "z.wav"]


def test_shards_are_disjoint_and_cover_everything():
    ids = [f"clip-{i:05d}" for i in range(1000)]
    shards = [{i for i in ids if tool.in_shard(i, k, 8)} for k in range(8)]
    assert set().union(*shards) == set(ids)
    assert sum(len(s) for s in shards) == len(ids)
    assert min(len(s) for s in shards) > 80  # roughly balanced
    with pytest.raises(tool.InputError, match="--shard 8/8"):
        tool.parse_shard("8/8")


def test_resume_drops_a_torn_line_and_optionally_errors(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(
        json.dumps({"id": "a", "answer": "x"})
        + "\n"
        + json.dumps({"id": "b", "error": {"type": "t", "message": "m"}})
        + "\n"
        + '{"id": "c", "ans'
    )
    assert tool.read_finished_ids(out, retry_errors=False) == {"a", "b"}
    assert out.read_text().count("\n") == 2 and out.read_text().endswith("\n")
    assert tool.read_finished_ids(out, retry_errors=True) == {"a"}
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a"]


def test_report_arithmetic():
    report = tool.RunReport(requests=3, wall_seconds=10.0, generate_seconds=4.0)
    for seconds, prompt, output in [(30.0, 800, 60), (15.0, 400, 20)]:
        report.add({"audio_seconds": seconds, "prompt_tokens": prompt, "output_tokens": output})
    report.add({"id": "x", "error": {}})
    summary = report.summary()
    assert (report.ok, report.failed) == (2, 1)
    assert summary["real_time_factor"] == 4.5
    assert summary["prompt_tokens_per_second"] == 300.0
    assert summary["output_tokens_per_second"] == 20.0


def speech_like(seconds: float, pauses: list[tuple[float, float]]) -> np.ndarray:
    """Tone bursts, silent inside the given (start, end) pauses."""
    rate = tool.SAMPLE_RATE
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    for start, end in pauses:
        x[int(start * rate) : int(end * rate)] = 0.0
    return x.astype(np.float32)


PAUSES = [(27.0, 27.8), (54.0, 54.6)]


def test_75s_recording_splits_into_3_segments_inside_pauses():
    samples = speech_like(75, PAUSES)
    ranges = tool.split_points(samples, 30.0)
    assert len(ranges) == 3
    assert ranges[0][0] == 0 and ranges[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for (_, cut), (start, end) in zip(ranges[:-1], PAUSES, strict=True):
        assert start * 16000 <= cut <= end * 16000
    assert all(b - a <= 30 * 16000 for a, b in ranges)


def test_split_truncate_and_error_policies():
    clip = tool.Clip("long.wav", speech_like(75, PAUSES), 16000, 1)
    options = tool.Options(None, "", False, "split", 30, 10, 2**30, 4096, 64)
    segments = tool.apply_long_audio_policy([clip], options, [])
    assert len(segments) == 3 and segments[0].start_seconds == 0.0
    for segment, after, (start, end) in zip(segments, segments[1:], PAUSES, strict=False):
        assert segment.end_seconds == after.start_seconds
        assert start <= after.start_seconds <= end
    assert segments[-1].end_seconds == 75.0
    warnings = []
    options.long_audio = "truncate"
    [segment] = tool.apply_long_audio_policy([clip], options, warnings)
    assert len(segment.clips[0]) == 30 * 16000
    assert warnings == ["audio long.wav: 75.0 s truncated to 30 s, 45.0 s dropped"]
    options.long_audio = "error"
    with pytest.raises(tool.InputError, match=r"long.wav \(75.0 s\): longer than 30 s"):
        tool.apply_long_audio_policy([clip], options, [])


def test_memory_estimate_for_qwen2_audio_7b_by_hand():
    # Published config: Whisper-large-v3 encoder (d 1280, 32 layers, ffn 5120)
    # and Qwen-7B (hidden 4096, 32 layers, 32 KV heads, ffn 11008, vocab 156032).
    d, ffn, layers = 1280, 5120, 32
    encoder = (
        128 * d * 3
        + d
        + d * d * 3
        + d
        + 1500 * d
        + layers * (4 * d * d + 3 * d + 2 * d * ffn + ffn + d + 4 * d)
        + 2 * d
    )
    h, inter, vocab = 4096, 11008, 156032
    text = 32 * (4 * h * h + 3 * h + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    projector = d * h + h
    est = tool.estimate_memory(tool.QWEN2_AUDIO_7B_CONFIG, "bfloat16", 4096, 5)
    assert est.parameters == encoder + text + projector
    assert 8.3e9 < est.parameters < 8.5e9  # "8.4B" as published
    assert est.weight_bytes == 2 * est.parameters
    assert est.kv_bytes_per_token == 32 * 32 * 128 * 2 * 2 == 524288
    assert est.kv_cache_bytes == 524288 * 4096 * 5  # 10 GiB
