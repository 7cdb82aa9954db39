"""Qwen3-ASR, the second model profile, end to end: a tiny checkpoint in the
published layout (tests/tiny_qwen3_asr.py, random weights) through the CLI
as users run it, on vLLM 0.23 (the image's) and 0.32. One engine start per
version answers a manifest that holds what the profile changes: the
prompt, a forced language, a clip longer than Qwen2-Audio's 30 s window
sent whole, a recording split into segments longer than that, a request
the model cannot take; every answer's ids equal transformers' on the
samples sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    QWEN3_ASR_CPU_ENV,
    chirp,
    first_vllm_run,
    read_jsonl,
    run_cli,
    tracebacks_of_ours,
)
from tiny_qwen3_asr import transformers_greedy_ids

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine
MAX_TOKENS = 12
RATE = 16000


def noise(seconds: float, seed: int) -> np.ndarray:
    """Speech-level noise: random weights answer noise and tones alike."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(
        np.float32
    )


def recording(folder):
    """75 s: speech-like stretches with pauses, where the split cuts."""
    parts = [noise(20, 1), np.zeros(RATE, np.float32), noise(24, 2)]
    parts += [np.zeros(RATE, np.float32), noise(29, 3)]
    samples = np.concatenate(parts)
    soundfile.write(folder / "long.wav", samples, RATE, subtype="FLOAT")
    return samples


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Clips whose lengths are whole 10 ms (vLLM 0.23 pads others to one)."""
    folder = tmp_path_factory.mktemp("qwen3-asr-audio")
    clips = {
        "short.wav": chirp(3, RATE)[:, 0],
        "forty.wav": noise(40, 4),
    }
    for name, samples in clips.items():
        soundfile.write(folder / name, samples, RATE, subtype="FLOAT")
    clips["long.wav"] = recording(folder)
    return folder, clips


def manifest(folder) -> list[dict]:
    return [
        {"id": "detect", "audio": "short.wav"},
        {"id": "forced", "audio": "short.wav", "language": "en", "reference": "a b c"},
        {"id": "forty", "audio": "forty.wav"},
        {"id": "long", "audio": "long.wav"},
        {"id": "two-clips", "audio": ["short.wav", "short.wav"]},
    ]


def run(model, folder, home, vllm, *flags):
    lines = "".join(json.dumps(line) + "\n" for line in manifest(folder))
    (folder / "manifest.jsonl").write_text(lines)
    return run_cli(
        "--model",
        model,
        "--manifest",
        folder / "manifest.jsonl",
        "--max-tokens",
        MAX_TOKENS,
        "--segment-seconds",  # the profile's default, 30 s, is checked in test_profiles
        "60",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        *flags,
        home=home,
        # A user's first run (the only Qwen3-ASR one): vLLM learns the model class.
        env={
            **IN_PROCESS_ENGINE,
            **QWEN3_ASR_CPU_ENV,
            "HF_HUB_OFFLINE": "1",
            **first_vllm_run(home),
        },
        python=vllm,
    )


def text_tokens(model, prompt: str) -> int:
    """The prompt's tokens but its one <|audio_pad|>, which the audio's replace."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(prompt).input_ids) - 1


def test_qwen3_asr_answers_a_manifest_as_transformers_does(
    qwen3_asr_model, audio, home, vllm, tmp_path
):
    folder, clips = audio
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    dry = run(qwen3_asr_model, folder, home, vllm, "--dry-run")
    assert dry.returncode == 2, dry.stderr[-3000:]  # the two-clip line cannot run
    assert "# model profile: qwen3-asr" in dry.stdout
    result = run(qwen3_asr_model, folder, home, vllm, "--output", out, "--report", report)
    assert result.returncode == 1, result.stderr[-3000:]  # one failed request
    assert not tracebacks_of_ours(result.stderr)
    records = {r["id"]: r for r in read_jsonl(out)}

    # What the model cannot take fails alone, said in one line.
    error = records["two-clips"]["error"]["message"]
    assert "2 clips in one prompt, but qwen3-asr takes 1" in error

    # vLLM's transcription prompt; a manifest language forces the answer's.
    detect, forced = records["detect"], records["forced"]
    assert detect["prompt"] == tool.QWEN3_ASR.prompt("", 1)
    assert forced["prompt"] == tool.QWEN3_ASR.prompt("", 1, None, "English")
    assert forced["answer_language"] == "English" and "answer_language" in detect
    assert "wer" in forced and forced["language"] == "en"
    # The tokens the dry run counted are the engine's: 13 a second, no window.
    counted = [int(line.split("prompt tokens ")[1].split()[0])
               for line in dry.stdout.splitlines() if "prompt tokens" in line]  # fmt: skip
    assert counted[:2] == [detect["prompt_tokens"], forced["prompt_tokens"]]

    for record in (detect, forced):
        ids = transformers_greedy_ids(
            qwen3_asr_model, clips["short.wav"], record["prompt"], MAX_TOKENS
        )
        assert record["token_ids"] == [ids], record["id"]

    # No 30 s window: 40 s in one prompt, 13 audio tokens a second.
    forty = records["forty"]
    assert "segments" not in forty
    assert forty["prompt_tokens"] == text_tokens(qwen3_asr_model, forty["prompt"]) + 520
    ids = transformers_greedy_ids(qwen3_asr_model, clips["forty.wav"], forty["prompt"], MAX_TOKENS)
    assert forty["token_ids"] == [ids]

    # 75 s is split (at its pauses, under 60 s); each segment's ids are
    # transformers' on exactly the samples sent (times are whole ms).
    long = records["long"]
    segments = long["segments"]
    lengths = [s["end"] - s["start"] for s in segments]
    assert len(lengths) == 2 and 30 < lengths[0] <= 60 and lengths[1] <= 60, lengths
    for segment in segments:
        start, end = round(segment["start"] * RATE), round(segment["end"] * RATE)
        sent = clips["long.wav"][start:end]
        ids = transformers_greedy_ids(qwen3_asr_model, sent, long["prompt"], MAX_TOKENS)
        assert segment["token_ids"] == [ids], segment
        expected = text_tokens(qwen3_asr_model, long["prompt"]) + tool.qwen3_asr_tokens(len(sent))
        assert segment["prompt_tokens"] == expected

    summary = json.loads(report.read_text())
    assert summary["ok"] == 4 and summary["failed"] == 1

    # --resume: what is done is not asked again (no engine starts).
    again = run(qwen3_asr_model, folder, home, vllm, "--output", out, "--resume")
    assert again.returncode == 0 and "nothing to do: all 5 request(s)" in again.stderr
    assert len(read_jsonl(out)) == 5
