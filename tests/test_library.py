"""The library core as Python users call it, in a fresh process of their own:
the README's example runs as written, and answer_requests gives the very
records the CLI writes to JSONL for the same requests (timing aside)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import hearing
import pytest
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    ROOT,
    read_jsonl,
    run_cli,
    user_env,
)

pytestmark = pytest.mark.engine
MAX_TOKENS = 8


def python_block(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_python(code: str, home, cwd) -> subprocess.CompletedProcess:
    script = cwd / "user_script.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)],
        env=user_env(home, {**IN_PROCESS_ENGINE, "PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def test_readme_example_runs_as_written(speech_model, home, tmp_path):
    # On the speech-trained model and speech it never heard: the example's
    # question is one it was trained on, so its answers can be held to the
    # words (random weights trip the answer guard on every clip: six attempts
    # of up to 256 tokens each).
    calls = tmp_path / "calls"
    calls.mkdir()
    spoken = {}
    for utterance in hearing.utterances(hearing.vocabulary(speech_model), 8, seed=2029):
        path = hearing.write_wav(calls / f"{utterance.id}.wav", utterance.samples)
        spoken[str(path)] = utterance.text
    code = python_block("## Python API")
    # The machine's differences only: our paths, and the CPU stand-ins for
    # an NPU that every engine test passes (float32, a CPU memory fraction).
    code = code.replace("/models/Qwen2-Audio-7B-Instruct", str(speech_model))
    code = code.replace("/data/calls", str(calls))
    code = code.replace("max_clips=1)", 'max_clips=1, dtype="float32", gpu_memory_utilization=0.3)')
    result = run_python(code, home, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # vLLM logs to stdout in a plain program (the CLI sends them to stderr):
    # the example's lines are those that start with a clip's path.
    printed = [line for line in result.stdout.splitlines() if line.startswith(str(calls))]
    ids = sorted(spoken)
    assert len(printed) == len(ids), result.stdout[-3000:]
    assert all(line.startswith(f"{path} ") for line, path in zip(printed, ids, strict=True))
    answers = [line[len(path) + 1 :] for line, path in zip(printed, ids, strict=True)]
    # Each id with its own clip's words: this model's WER on held-out 16 kHz
    # WAVs through the CLI is 0.5-1.1% by build (docs/testing.md); a swapped
    # pair of ids alone would score about 25%.
    rate = hearing.word_error_rate([spoken[path] for path in ids], answers)
    print(f"README example: WER {rate:.1%} over {len(ids)} utterances")
    assert rate <= 0.15, printed


LIBRARY_RUN = """
import json
from pathlib import Path

import run_qwen2_audio as rqa
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(**rqa.engine_kwargs(model=sys.argv[1], max_clips=1, dtype="float32",
                                  gpu_memory_utilization=0.3))
    requests = rqa.read_manifest(Path(sys.argv[2]))
    params = SamplingParams(temperature=0, max_tokens=%d)
    options = rqa.Options(guard=rqa.Guard(fallback=()))  # the CLI's --temperature-fallback none
    for record in rqa.answer_requests(llm, requests, params, options):
        print(json.dumps(record))
"""


def test_records_from_python_equal_the_cli_jsonl(tiny_model, clips, home, tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    lines = [{"id": name, "audio": str(path)} for name, path in clips.items()]
    lines.append({"id": "broken", "audio": str(tmp_path / "missing.wav")})
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "cli.jsonl"
    cli = run_cli(
        "--model",
        tiny_model,
        "--manifest",
        manifest,
        "--output",
        out,
        "--temperature",
        "0",
        "--max-tokens",
        MAX_TOKENS,
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env=IN_PROCESS_ENGINE,
    )
    assert cli.returncode == 1, cli.stderr[-3000:]  # 1: "broken" failed
    # stderr is not a terminal: plain progress lines, not a redrawn bar, and
    # always one when the last request is done.
    progress = [x for x in cli.stderr.splitlines() if x.startswith("[5/5] ")]
    assert len(progress) == 1 and "\r" not in cli.stderr, cli.stderr[-3000:]
    assert re.fullmatch(r"\[5/5\] [\d.]+ req/s, [\d.]+ audio s/s, 1 failed, ETA 0 s", progress[0])
    code = LIBRARY_RUN % MAX_TOKENS
    code = code.replace("sys.argv[1]", repr(str(tiny_model))).replace(
        "sys.argv[2]", repr(str(manifest))
    )
    library = run_python(code, home, tmp_path)
    assert library.returncode == 0, library.stderr[-3000:]

    def without_timing(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "timing"}

    from_cli = [without_timing(r) for r in read_jsonl(out)]
    printed = [x for x in library.stdout.splitlines() if x.startswith("{")]  # vLLM logs too
    from_python = [without_timing(json.loads(x)) for x in printed]
    assert from_python == from_cli
    assert [r["id"] for r in from_cli] == sorted(x["id"] for x in lines)
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert by_id["broken"]["error"]["type"] == "input_error"
    timing = by_id["a.wav"]["timing"]
    assert set(timing) == {"decode_seconds", "wait_for_audio_seconds", "engine_seconds"}
