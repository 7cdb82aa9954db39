"""No input ends a batch, no exit code lies: the failure classes a careful
read found, each tried as users meet it, a fresh `python run_qwen2_audio.py`
process with a user's environment (the real engine where one is involved).

- a manifest value that Python's URL, path or HTTP code would choke on is
  that line's error record, with its id, never the batch's end;
- a long clip is never lost to its own tail, and a silent tail is not sent;
- a path with a colon is a path;
- an answer cut off at --max-tokens says so, in its record and the summary;
- multi-channel AAC/M4A (ffmpeg's own files) decodes;
- where vLLM cannot be imported, every command is one line (and --help works).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import (
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    ROOT,
    local_http_server,
    one_error_line,
    run_cli,
    speech_like,
    tone,
    tracebacks_of_ours,
)

import run_qwen2_audio as tool

MAX_TOKENS = 6  # random weights: every answer runs to the limit


class CutShortHandler(http.server.BaseHTTPRequestHandler):
    """Promises 100,000 bytes, sends 100 and hangs up (IncompleteRead)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"RIFF" + b"\0" * 96)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def cut_short_url():
    with local_http_server(CutShortHandler) as url:
        yield f"{url}/cut.wav"


def speech_then_silence(
    speech_seconds: float, total_seconds: float, pauses: list[tuple[float, float]]
) -> np.ndarray:
    """Tone "speech" with pauses, then digital silence."""
    x = np.zeros(int(total_seconds * 16000), np.float32)
    x[: int(speech_seconds * 16000)] = speech_like(speech_seconds, pauses)
    return x


# id -> (audio value in the manifest, the error type expected, or None: answered)
def hostile_manifest(folder: Path, cut_short_url: str) -> dict[str, tuple[object, str | None]]:
    soundfile.write(folder / "take:2.wav", tone(2, 16000), 16000)
    soundfile.write(folder / "2026-11-30T10:00.wav", tone(2, 16000, 660), 16000)
    # 30.01 s ending in silence: once cut at 29.99 s, a 0.02 s tail that the
    # engine refused, and the whole recording with it.
    soundfile.write(folder / "tail.wav", speech_then_silence(29.5, 30.01, [(27.0, 27.8)]), 16000)
    # 30.3 s of speech with no pause, then 1.3 s of silence: the tail a cut
    # leaves (at least a second) is silence the model would only make
    # something up for.
    soundfile.write(folder / "silent-tail.wav", speech_then_silence(29.0, 30.3, []), 16000)
    return {
        "colon-take": ("take:2.wav", None),
        "colon-iso-time": ("2026-11-30T10:00.wav", None),
        "tail": ("tail.wav", None),
        "silent-tail": ("silent-tail.wav", None),
        "list-with-one-bad": (["take:2.wav", "http://[x/a.wav"], "input_error"),
        "ipv6-bracket": ("//[x", "input_error"),
        "url-bracket": ("http://[x", "input_error"),
        "url-bad-port": ("http://127.0.0.1:99999/a.wav", "input_error"),
        "url-word-port": ("http://127.0.0.1:http/a.wav", "input_error"),
        "url-space": ("http://127.0.0.1/a b.wav", "input_error"),
        "url-no-host": ("http:///a.wav", "input_error"),
        "url-cut-short": (cut_short_url, "input_error"),
        "s3": ("s3://bucket/a.wav", "input_error"),
        "tilde-nobody": ("~no-such-user-rqa/a.wav", "input_error"),
        "percent": ("%zz%.wav", "input_error"),  # a path: no such file
    }


@pytest.mark.engine
def test_one_bad_value_never_ends_the_batch(vllm, tiny_model, tmp_path, home, cut_short_url):
    cases = hostile_manifest(tmp_path, cut_short_url)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": i, "audio": audio}) + "\n" for i, (audio, _) in cases.items())
    )
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = run_cli(
        "--model", tiny_model, "--manifest", manifest, "--output", out, "--report", report,
        "--temperature", "0", "--max-tokens", MAX_TOKENS, "--no-progress", *CPU_ENGINE_FLAGS,
        home=home, python=vllm, env=IN_PROCESS_ENGINE,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]  # finished, some failed
    assert not tracebacks_of_ours(result.stderr), result.stderr[-3000:]
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == sorted(cases)  # every id once, errors keep theirs
    for request_id, (_, error_type) in cases.items():
        record = records[request_id]
        if error_type is None:
            assert "error" not in record, record
        else:
            assert record["error"]["type"] == error_type, record
            assert "\n" not in record["error"]["message"]
    messages = {i: r["error"]["message"] for i, r in records.items() if "error" in r}
    for request_id in ("url-bracket", "url-bad-port", "url-word-port", "url-space", "url-no-host"):
        assert "not a valid URL" in messages[request_id], messages[request_id]
    assert "download failed" in messages["url-cut-short"]
    assert "scheme s3:// is not supported" in messages["s3"]
    assert "~no-such-user-rqa is not a user here" in messages["tilde-nobody"]

    # Long clips: no segment under a second; the silent tail is not sent.
    for request_id in ("tail", "silent-tail"):
        segments = records[request_id]["segments"] if "segments" in records[request_id] else []
        assert all(s["end"] - s["start"] >= tool.MIN_SEGMENT_SECONDS for s in segments)
    assert len(records["tail"]["segments"]) == 2
    assert records["tail"]["segments"][-1]["end"] == 30.01
    tail = records["silent-tail"]["segments"]
    assert [s.get("silent", False) for s in tail] == [False, True]
    assert tail[-1]["answers"] == [""] and tail[-1]["prompt_tokens"] == 0

    # Cut-off answers: each says so, and the summary counts them.
    answered = [r for r in records.values() if "error" not in r]
    cut = [r for r in answered if r["finish_reason"] == "length" or r.get("truncated")]
    assert cut, "random weights at 6 tokens: answers run to the limit"
    for record in cut:
        assert record["truncated"] is True
        assert any("cut off at max_tokens" in w for w in record["warnings"]), record
    summary = json.loads(report.read_text())
    assert summary["truncated"] == len(cut)
    assert summary["ok"] == len(answered) and summary["failed"] == len(records) - len(answered)
    assert f"warning: {len(cut)} answer(s) cut off at --max-tokens" in result.stderr


def test_a_path_with_a_colon_is_a_path_for_one_clip_too(tiny_model, tmp_path, home):
    soundfile.write(tmp_path / "take:2.wav", tone(2, 16000), 16000)
    result = run_cli(
        "--model", tiny_model, "--audio", "take:2.wav", "--dry-run",
        home=home, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "audio tokens [50]" in result.stdout


@pytest.mark.parametrize(
    "audio, says",
    [
        ("http://[x", "not a valid URL"),
        ("http://127.0.0.1:99999/a.wav", "not a valid URL"),
        ("s3://bucket/a.wav", "scheme s3:// is not supported"),
        ("~no-such-user-rqa/a.wav", "is not a user here"),
    ],
)
def test_a_bad_source_for_one_clip_is_one_line(tiny_model, tmp_path, home, audio, says):
    result = run_cli("--model", tiny_model, "--audio", audio, home=home, cwd=tmp_path)
    assert says in one_error_line(result)


def ffmpeg_tone(path: Path, channels: int, seconds: float = 3.0, rate: int = 48000) -> Path:
    """A real multi-channel AAC file made by Debian's ffmpeg: a 440 Hz sine
    in every channel."""
    layout = {1: "mono", 2: "stereo", 3: "3.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}[channels]
    made = subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
         f"sine=frequency=440:sample_rate={rate}:duration={seconds}",
         "-af", f"aformat=channel_layouts={layout}", "-c:a", "aac", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return path


@pytest.mark.parametrize("channels", [3, 5, 6, 7])
@pytest.mark.parametrize("suffix", [".m4a", ".aac"])
def test_multichannel_aac_decodes_whole(tmp_path, channels, suffix):
    """libsndfile cannot read AAC; the fallback must downmix any channel
    count (8192-byte chunks are not whole frames of 3, 5, 6 or 7 channels)."""
    clip = tool.load_clip(str(ffmpeg_tone(tmp_path / f"tone{suffix}", channels)), tool.Options())
    assert clip.original_channels == channels and clip.original_rate == 48000
    assert abs(clip.seconds - 3.0) < 0.1  # AAC priming and padding: a few frames
    spectrum = np.abs(np.fft.rfft(clip.samples[8000:40000]))
    assert abs(np.argmax(spectrum) * 16000 / 32000 - 440) <= 1  # the tone survives


def test_multichannel_m4a_through_the_cli(tiny_model, tmp_path, home):
    path = ffmpeg_tone(tmp_path / "five-one.m4a", 6, seconds=4.0)
    result = run_cli("--model", tiny_model, "--audio", path, "--dry-run", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = int(result.stdout.split("audio tokens [")[1].split("]")[0])
    assert 99 <= tokens <= 102  # 25 per second, 4 s (+ AAC padding)


# Where vLLM cannot be imported: a fresh `pip install -r requirements.txt`
# (tests/run.sh builds that virtualenv), or vLLM failing on a library.


@pytest.fixture(scope="module")
def plain_python() -> str:
    python = os.environ.get("PLAIN_PYTHON", "")
    assert python and Path(python).exists(), (
        "PLAIN_PYTHON: the requirements.txt-only virtualenv; bash tests/run.sh builds it"
    )
    return python


@pytest.mark.parametrize(
    "args",
    [
        ["--audio-count", "2"],
        ["--dry-run"],
        ["--audio", "x.wav"],
        ["--manifest", "jobs.jsonl", "--output", "out.jsonl"],
    ],
)
def test_without_vllm_every_command_is_one_line(plain_python, tmp_path, home, args):
    result = run_cli(*args, home=home, python=plain_python, cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith("error: cannot import "), line
    assert "No module named" in line and "vllm-ascend image" in line and "pip install" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_without_vllm_help_lists_our_flags_and_says_why_the_engine_flags_are_missing(
    plain_python, home
):
    result = run_cli("--help", home=home, python=plain_python)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--manifest" in result.stdout and "--long-audio" in result.stdout
    assert "vLLM's engine flags" in result.stdout and "No module named" in result.stdout
    assert "Traceback" not in result.stderr


def test_vllm_failing_on_a_native_library_is_one_line(tiny_model, tmp_path, home):
    """Inside the image without CANN's set_env.sh, `import vllm` fails on a
    shared library: the one line carries that library's name."""
    # vLLM's package imports; loading its platform (vllm-ascend's, when
    # EngineArgs is imported) fails, as it does where CANN is not set up.
    shadow = tmp_path / "shadow" / "vllm"
    (shadow / "engine").mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "engine" / "__init__.py").write_text("")
    (shadow / "engine" / "arg_utils.py").write_text(
        'raise OSError("libascendcl.so: cannot open shared object file: No such file")\n'
    )
    result = run_cli(
        "--model", tiny_model, "--audio-count", "2",
        home=home, env={"PYTHONPATH": str(shadow.parent)}, cwd=ROOT,
    )  # fmt: skip
    line = one_error_line(result)
    assert "cannot import vllm.engine.arg_utils (OSError: libascendcl.so: cannot open" in line
    assert "set_env.sh" in line
    help_text = run_cli("--help", home=home, env={"PYTHONPATH": str(shadow.parent)})
    assert help_text.returncode == 0 and "libascendcl.so" in help_text.stdout


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--max-tokens", "0"], "sampling flags: "),
        (["--temperature", "-1"], "sampling flags: "),
        (["--n", "0"], "sampling flags: "),
        (["--report", "no-such-dir/report.json"], "--report no-such-dir/report.json: cannot"),
        (["--model", "~no-such-user-rqa/ckpt"], "~no-such-user-rqa is not a user here"),
        (["--n", "2", "--temperature-fallback", "0,0.5"], "n must be 1 when using greedy"),
        (["--silence-db", "6"], "--silence-db 6.0: must be a level in dBFS, 0 or below"),
        (["--silence-db", "nan"], "--silence-db nan: must be a level in dBFS"),
        (["--temperature-fallback", "-0.5"], "temperatures must be numbers of 0 or more"),
    ],
)
def test_bad_flags_are_bad_input_not_a_crash(tiny_model, tmp_path, home, flags, says):
    """Exit 2 and one line before anything loads, never 70 ("crashed,
    resume") for a value that no resume can fix."""
    soundfile.write(tmp_path / "a.wav", tone(1, 16000), 16000)
    model = [] if "--model" in flags else ["--model", tiny_model]
    result = run_cli(*model, "--audio", "a.wav", "--output", "a.json", *flags,
                     home=home, cwd=tmp_path)  # fmt: skip
    assert says in one_error_line(result)
    assert not (tmp_path / "a.json").exists()


def test_negative_decimals_after_a_flag_are_values(tiny_model, tmp_path, home):
    """vLLM's parser takes `-0.5` for a dotted config option (`-O.level`):
    the tool hands it `--logprob-threshold=-0.5` instead."""
    soundfile.write(tmp_path / "long.wav", tone(40, 16000), 16000)
    result = run_cli(
        "--model", tiny_model, "--audio", "long.wav", "--dry-run",
        "--logprob-threshold", "-0.5", "--silence-db", "-40.5", "--temperature-fallback", "0.5,1",
        home=home, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# segment 1 [" in result.stdout


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--output", "./jobs.jsonl"], "--output jobs.jsonl is the --manifest file"),
        (["--output", "./jobs.jsonl", "--resume"], "--output jobs.jsonl is the --manifest file"),
        (
            ["--output", "o.jsonl", "--report", "jobs.jsonl"],
            "--report jobs.jsonl is the --manifest",
        ),
        (["--output", "o.jsonl", "--report", "o.jsonl"], "--report o.jsonl is the --output file"),
    ],
)
def test_results_are_never_written_over_the_inputs(tiny_model, tmp_path, home, flags, says):
    """--output jobs.jsonl beside --manifest jobs.jsonl would empty the manifest
    (or, resuming, read its lines as finished requests and answer nothing); a
    --report written over --output would replace the results."""
    soundfile.write(tmp_path / "a.wav", tone(1, 16000), 16000)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav"}) + "\n")
    (tmp_path / "o.jsonl").write_text('{"id": "earlier"}\n')
    before = manifest.read_bytes(), (tmp_path / "o.jsonl").read_bytes()
    result = run_cli("--model", tiny_model, "--manifest", "jobs.jsonl", *flags,
                     home=home, cwd=tmp_path)  # fmt: skip
    assert says in one_error_line(result)
    assert (manifest.read_bytes(), (tmp_path / "o.jsonl").read_bytes()) == before
