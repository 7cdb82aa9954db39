"""Subtitles and one file per request: srt/vtt/tsv cues follow the segments
of long audio (split at pauses) or span a short clip, parse with real
subtitle parsers and cover the audio without overlaps; --output-dir writes
each request's file whole, named after its id (its --resume:
test_each_decision_once.py)."""

from __future__ import annotations

import csv
import json

import pytest
import soundfile
import srt
import webvtt
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    PAUSES,
    one_error_line,
    run_cli,
    speech_like,
)
from hypothesis import given
from hypothesis import strategies as st

import run_qwen2_audio as tool

LONG_SECONDS = 75.0


@pytest.fixture(scope="module")
def recordings(tmp_path_factory, clips):
    """A 75 s talk with two pauses (split in three) and a 3 s clip."""
    folder = tmp_path_factory.mktemp("recordings")
    soundfile.write(folder / "long.wav", speech_like(LONG_SECONDS, PAUSES), 16000)
    manifest = folder / "talks.jsonl"
    lines = [
        {"id": "talks/long.wav", "audio": str(folder / "long.wav")},
        {"id": "short", "audio": str(clips["a.wav"])},
    ]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def run_to_directory(tiny_model, manifest, directory, home, *flags):
    return run_cli(
        "--model",
        tiny_model,
        "--manifest",
        manifest,
        "--output-dir",
        directory,
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        *flags,
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env=IN_PROCESS_ENGINE,
    )


def read_cues(path, fmt) -> list[tuple[float, float, str]]:
    """(start, end, text) in seconds, by each format's own parser."""
    if fmt == "srt":
        return [
            (c.start.total_seconds(), c.end.total_seconds(), c.content)
            for c in srt.parse(path.read_text(), ignore_errors=False)
        ]
    if fmt == "vtt":
        return [(seconds(c.start), seconds(c.end), c.text) for c in webvtt.read(str(path))]
    rows = list(csv.reader(path.open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["start", "end", "text"]
    return [(int(a) / 1000, int(b) / 1000, text) for a, b, text in rows[1:]]


def seconds(vtt_time: str) -> float:
    hours, minutes, rest = vtt_time.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


@pytest.mark.engine
@pytest.mark.parametrize("fmt", ["srt", "vtt", "tsv"])
def test_cues_cover_the_audio_without_overlaps(tiny_model, recordings, home, tmp_path, fmt):
    out = tmp_path / "subs"
    result = run_to_directory(tiny_model, recordings, out, home, "--output-format", fmt)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [f"short.{fmt}", f"talks%2Flong.wav.{fmt}"]

    long_cues = read_cues(out / f"talks%2Flong.wav.{fmt}", fmt)
    assert len(long_cues) == 3 and all(text.strip() for _, _, text in long_cues)
    starts = [start for start, _, _ in long_cues]
    ends = [end for _, end, _ in long_cues]
    assert starts[0] == 0.0 and ends[-1] == LONG_SECONDS
    assert starts[1:] == ends[:-1], "each cue starts where the one before ends"
    for cut, (pause_start, pause_end) in zip(ends[:-1], PAUSES, strict=True):
        assert pause_start <= cut <= pause_end, "cuts fall in the pauses"
    [(start, end, text)] = read_cues(out / f"short.{fmt}", fmt)
    assert (start, end) == (0.0, 3.0) and text.strip()


def test_timestamps_follow_whisper_conventions():
    assert tool.timestamp(3723.4567, ",") == "01:02:03,457"  # SRT
    assert tool.timestamp(59.9996, ".") == "00:01:00.000"  # VTT: hours always shown
    record = {"answer": "a\n\nb --> c", "clip_seconds": [2.5], "answers": ["a\n\nb --> c"]}
    assert tool.render("srt", record) == "1\n00:00:00,000 --> 00:00:02,500\na\nb -> c\n\n"
    assert tool.render("vtt", record).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n")
    assert tool.render("tsv", record) == "start\tend\ttext\n0\t2500\ta b --> c\n"


@given(st.lists(st.text(min_size=1, max_size=300), min_size=2, max_size=6, unique=True))
def test_file_names_are_safe_and_distinct_for_distinct_ids(ids):
    names = [tool.output_file_name(i, "srt") for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and "\0" not in name and not name.startswith(".")
        assert len(name.encode()) <= 255 and name.endswith(".srt")


def test_full_disk_in_the_output_dir_leaves_whole_files_only(tiny_filesystem):
    (tiny_filesystem / "filler").write_bytes(b"\x00" * (60 * 1024))  # 4 KiB left
    out = tiny_filesystem / "results"
    writer = tool.DirectoryWriter(out, "json")
    writer.write({"id": "small", "answer": "hi", "answers": ["hi"]})
    with pytest.raises(tool.OutputError) as raised:
        writer.write({"id": "large", "answer": "x" * 20_000, "answers": ["x" * 20_000]})
    writer.close(complete=False)
    assert str(raised.value) == (
        f"--output-dir {out}: cannot write large.json (No space left on device); the files "
        "written before it are whole; free space, then rerun with --resume"
    )
    assert [p.name for p in out.iterdir()] == ["small.json"]


def test_a_second_run_on_the_same_output_dir_refuses(tmp_path):
    first = tool.DirectoryWriter(tmp_path / "results", "srt")
    with pytest.raises(tool.ExplainedError, match="another run is writing to it"):
        tool.DirectoryWriter(tmp_path / "results", "srt")
    first.close(complete=True)
    tool.DirectoryWriter(tmp_path / "results", "srt").close(complete=True)  # free again


def test_output_dir_that_is_a_file(tiny_model, recordings, home, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("not a directory")
    result = run_cli(
        "--model", tiny_model, "--manifest", recordings, "--output-dir", taken, home=home
    )
    error = one_error_line(result)
    assert f"--output-dir {taken}: cannot create or open it" in error
    assert "choose a directory you can write to" in error


def test_output_dir_that_cannot_be_created(tiny_model, recordings, home):
    result = run_cli(
        "--model", tiny_model, "--manifest", recordings, "--output-dir", "/proc/results", home=home
    )
    assert "--output-dir /proc/results: cannot create or open it" in one_error_line(result)


def test_subtitles_of_a_batch_need_an_output_dir(tiny_model, recordings, home, tmp_path):
    result = run_cli(
        "--model", tiny_model, "--manifest", recordings, "--output", tmp_path / "all.srt", home=home
    )
    error = one_error_line(result)
    assert "--output-format srt: subtitles are one file per recording" in error
    assert "--output-dir DIR" in error
    assert not (tmp_path / "all.srt").exists()


def test_output_and_output_dir_together(tiny_model, clips, home, tmp_path):
    result = run_cli(
        "--model",
        tiny_model,
        "--audio",
        clips["a.wav"],
        "--output",
        tmp_path / "a.json",
        "--output-dir",
        tmp_path,
        home=home,
    )
    assert "--output and --output-dir: give one" in one_error_line(result)
