"""End to end on the real vLLM engine (CPU) with the tiny checkpoint of the
real vocabulary, on vLLM 0.23 (the image's) and 0.32, each run a fresh process
in a user's environment: the script's greedy output ids equal transformers' reference
implementation."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    first_vllm_run,
    load_json_output,
    run_cli,
)
from reference import transformers_greedy_ids
from transformers import AutoTokenizer

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine
MAX_TOKENS = 16


def text_tokens(model_dir, prompt: str, clips: int) -> int:
    """Tokens of the prompt without its <|AUDIO|> placeholders."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return len(tokenizer(prompt, add_special_tokens=False).input_ids) - clips


def as_the_script_decodes(paths) -> list[np.ndarray]:
    options = tool.Options()
    return [tool.load_clip(str(p), options).samples for p in paths]


def test_two_clips_in_one_prompt_match_transformers(real_vocabulary_model, clips, home, vllm):
    paths = [clips["b.mp3"], clips["a.wav"]]  # 5 s 44.1 kHz stereo, 3 s 16 kHz
    result = run_cli(
        "--model",
        real_vocabulary_model,
        "--audio",
        *paths,
        "--temperature",
        "0",
        "--max-tokens",
        MAX_TOKENS,
        "--output-format",
        "json",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env=IN_PROCESS_ENGINE,
        python=vllm,
    )
    [record] = load_json_output(result)

    assert record["prompt"] == tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, 2)
    expected_tokens = text_tokens(real_vocabulary_model, record["prompt"], 2) + 25 * 5 + 25 * 3
    assert record["prompt_tokens"] == expected_tokens
    ref_prompt_tokens, ref_ids = transformers_greedy_ids(
        real_vocabulary_model, record["prompt"], as_the_script_decodes(paths), MAX_TOKENS
    )
    assert record["prompt_tokens"] == ref_prompt_tokens
    assert record["token_ids"] == [ref_ids]
    assert record["output_tokens"] == MAX_TOKENS == len(ref_ids)
    assert record["finish_reason"] == "length"
    assert record["audio"] == [str(p) for p in paths]
    assert record["audio_seconds"] == pytest.approx(8.0, abs=0.01)
    assert record["answer"] == record["answers"][0]


def test_one_demo_clip_matches_transformers(real_vocabulary_model, demo_assets_cache, home, vllm):
    """--audio-count 1 takes vLLM's AudioAsset('mary_had_lamb') (from its cache)."""
    result = run_cli(
        "--model",
        real_vocabulary_model,
        "--audio-count",
        "1",
        "--temperature",
        "0",
        "--max-tokens",
        MAX_TOKENS,
        "--output-format",
        "json",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env={"VLLM_ASSETS_CACHE": str(demo_assets_cache), **IN_PROCESS_ENGINE},
        python=vllm,
    )
    [record] = load_json_output(result)

    assert record["audio"] == ["asset:mary_had_lamb"]
    assert record["prompt"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "What is recited in the audio?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert record["prompt_tokens"] == text_tokens(real_vocabulary_model, record["prompt"], 1) + 100
    samples, rate = soundfile.read(
        demo_assets_cache / "vllm_public_assets" / "mary_had_lamb.ogg", dtype="float32"
    )
    assert rate == 16000
    _, ref_ids = transformers_greedy_ids(
        real_vocabulary_model, record["prompt"], [samples], MAX_TOKENS
    )
    assert record["token_ids"] == [ref_ids]


def test_tutorial_defaults_print_only_the_answer(
    real_vocabulary_model, demo_assets_cache, home, vllm
):
    """No flags but the model, a user's first run (vLLM's cache empty): two
    demo clips, tutorial sampling, text on stdout and every log line on
    stderr, with vLLM's engine core in its own process as users run it. The
    answer guard is on, as users get it (over the real vocabulary these random
    weights answer confidently enough that it may not ask again): stdout holds
    the kept answer alone."""
    result = run_cli(
        "--model",
        real_vocabulary_model,
        *CPU_ENGINE_FLAGS,
        home=home,
        env={"VLLM_ASSETS_CACHE": str(demo_assets_cache), **first_vllm_run(home)},
        python=vllm,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The answer alone on stdout (random weights over the real vocabulary may
    # answer with line breaks of their own), every log line on stderr.
    assert result.stdout.strip()
    logs = ("INFO", "WARNING", "DEBUG", "(EngineCore")
    assert not [line for line in result.stdout.splitlines() if line.startswith(logs)]
    assert "INFO" not in result.stdout and "INFO" in result.stderr
    assert "Qwen2AudioForConditionalGeneration" in result.stderr
    # The engine is stopped at once after the answer (its workers killed, as
    # vLLM's server does): Python's resource tracker cleans up after them
    # without printing "leaked shared_memory" warnings.
    assert "resource_tracker" not in result.stderr, result.stderr[-3000:]
