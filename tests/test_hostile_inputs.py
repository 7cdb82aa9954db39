"""Every hostile input, alone and inside a batch. Alone: a bad file ends in
exit 2 and one line naming it and the fix; a strange but valid file is
answered. In a batch: the bad file becomes an error record for its id and
every other request gets its correct answer. The two-hour file is asked
alone only: in a batch it would add minutes (260 segments) and no property,
a long file's segments in a manifest being the hearing tests' subject."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    ROOT,
    SCRIPT,
    one_error_line,
    read_jsonl,
    user_env,
)
from hostile import (
    NON_UTF8_NAME,
    TWO_HOURS,
    build_corpus,
    without_root_read_override,
    write_two_hour_wav,
)
from reference import transformers_greedy_ids

import run_qwen2_audio as tool

BAD = [
    "empty",
    "truncated-header",
    "text",
    "picture",
    "directory",
    "unreadable",
    "nan",
    "inf",
    "blip",
    "loop",
]
VALID = ["silence", "surround-96k", "two-hours", "non-utf8-name"]
MAX_TOKENS = 4


@pytest.fixture(scope="session")
def two_hour_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "two-hours-8k.wav"
    write_two_hour_wav(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, two_hour_wav):
    cases = build_corpus(tmp_path_factory.mktemp("hostile"), two_hour_wav)
    return {case.id: case for case in cases}


def run_as_user(*args, home: Path, timeout=900) -> subprocess.CompletedProcess:
    """The script as a user runs it: a fresh process in a user's environment
    that, even under root, obeys file modes."""
    return subprocess.run(
        [*without_root_read_override(), sys.executable, str(SCRIPT), *args],
        env=user_env(home, IN_PROCESS_ENGINE),
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize("case_id", BAD)
def test_bad_file_alone_exits_2_with_one_line_naming_it(case_id, corpus, tiny_model, home):
    case = corpus[case_id]
    result = run_as_user("--model", str(tiny_model), "--audio", str(case.path), home=home)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    err = one_error_line(result)
    assert err.startswith(f"error: audio {case.path}: ")
    assert case.message in err


@pytest.mark.engine
@pytest.mark.parametrize("case_id", VALID)
def test_strange_but_valid_file_alone_is_answered(case_id, corpus, tiny_model, home):
    case = corpus[case_id]
    result = run_as_user(
        "--model",
        str(tiny_model),
        "--audio",
        bytes(case.path) if case_id == "non-utf8-name" else str(case.path),
        "--output-format",
        "json",
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    (record,) = json.loads(result.stdout)
    check_answered(record, case)


def check_answered(record: dict, case) -> None:
    assert record["audio_seconds"] == case.seconds
    segments = record.get("segments", [{"start": 0.0, "end": case.seconds}])
    assert len(record["token_ids"][0]) == MAX_TOKENS * len(segments)
    # Split audio is covered exactly: contiguous segments from 0 to the end.
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == case.seconds
    assert all(a["end"] == b["start"] for a, b in zip(segments[:-1], segments[1:], strict=True))
    assert all(s["end"] - s["start"] <= 30.0 for s in segments)
    if case.id == "two-hours":
        assert len(segments) >= TWO_HOURS // 30
    if case.id == "non-utf8-name":
        assert record["audio"][0].endswith("caf\\xe9-latin1.wav")


@pytest.mark.engine
def test_hostile_batch_loses_only_the_bad_items(corpus, clips, tiny_model, tmp_path, home):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.wav", "b.mp3"):
        (folder / name).write_bytes(clips[name].read_bytes())
    cases = {case_id: case for case_id, case in corpus.items() if case_id != "two-hours"}
    lines = [json.dumps({"id": c.id, "audio": str(c.path)}) for c in cases.values()]
    lines += [
        json.dumps({"id": "good-a", "audio": "a.wav"}),  # relative to the manifest
        json.dumps({"id": "good-b", "audio": str(folder / "b.mp3")}),
        '{"id": "torn", "audio": "a.w',
        json.dumps({"id": "wrong-type", "audio": 7}),
        json.dumps({"id": "no-audio"}),
        json.dumps({"id": "good-a", "audio": "b.mp3"}),  # duplicate id
        json.dumps({"id": "extra", "audio": "a.wav", "speaker": "x"}),
        json.dumps({"id": "smuggled", "audio": "file:///etc/passwd"}),
    ]
    manifest = folder / "jobs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    result = run_as_user(
        "--model",
        str(tiny_model),
        "--manifest",
        str(manifest),
        "--output",
        str(out),
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
    )
    assert result.returncode == 1, result.stderr.decode()[-3000:]  # 1: some failed

    records = read_jsonl(out)
    by_id = {r["id"]: r for r in records}
    # Lines without a usable id (torn JSON) or with a taken one are named
    # file:line; the others keep their own id.
    first_bad = len(cases) + 3
    bad_lines = {f"jobs.jsonl:{first_bad}", f"jobs.jsonl:{first_bad + 3}"}
    bad_lines |= {"wrong-type", "no-audio", "extra", "smuggled"}
    assert len(records) == len(by_id) == len(cases) + 2 + len(bad_lines)
    assert set(by_id) == set(cases) | {"good-a", "good-b"} | bad_lines
    for case in cases.values():
        record = by_id[case.id]
        if case.error_type:
            assert record["error"]["type"] == case.error_type
            assert case.message in record["error"]["message"]
        else:
            check_answered(record, case)
    for request_id, name in (("good-a", "a.wav"), ("good-b", "b.mp3")):
        record = by_id[request_id]
        samples = tool.load_clip(str(folder / name), tool.options_from_args(parse([]))).samples
        _, expected = transformers_greedy_ids(tiny_model, record["prompt"], [samples], MAX_TOKENS)
        assert record["token_ids"] == [expected]
    messages = " | ".join(by_id[i]["error"]["message"] for i in sorted(bad_lines))
    for expected in ("not valid JSON", '"audio" must be', "duplicate id", "unknown key(s) speaker"):
        assert expected in messages
    assert "scheme file:// is not supported" in messages


def parse(argv):
    return tool.build_parser().parse_args(argv)


def test_two_hour_file_is_decoded_into_memory_once(two_hour_wav):
    tracemalloc.start()
    try:
        clip = tool.decode_to_16k_mono(str(two_hour_wav), "two-hours")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert clip.seconds == TWO_HOURS and clip.original_rate == 8000
    # The 16 kHz result (460 MB) plus one 10 s block: never a second copy.
    assert clip.samples.nbytes <= peak < clip.samples.nbytes * 1.01


def test_audio_dir_names_a_non_utf8_file_printably(tmp_path):
    path = bytes(tmp_path) + b"/" + NON_UTF8_NAME
    soundfile.write(path, np.zeros(1600), 16000)
    (request,) = tool.scan_audio_dir(tmp_path)
    assert request.id == "caf\\xe9-latin1.wav"
    request.id.encode("utf-8")  # writable as UTF-8
