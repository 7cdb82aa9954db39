"""The files users hold: Qwen2-Audio-7B-Instruct and Qwen2-Audio-7B as
published (their metadata files, tests/fixtures/published, with SOURCES.md
saying where each comes from; the real Qwen2 vocabulary; the weight shards'
names). Every path that reads a checkpoint without loading weights runs on
them: --dry-run (memory, token budget, prompt), the prompt format "auto"
(Instruct or base), the checks before loading; as --model DIR, as a hub id in
an offline Hugging Face cache, and in ModelScope's cache on vLLM 0.23.

Before issue 27 every --dry-run here ended with "the run crashed (KeyError:
'hidden_size')": the published text_config leaves the Qwen2 geometry to
transformers' defaults."""

from __future__ import annotations

import json

import pytest
from helpers import (
    VLLM_PYTHONS,
    cache_in_hugging_face_hub,
    cache_in_modelscope,
    run_cli,
    vllm_python,
)
from published import BASE, INSTRUCT, published_checkpoint
from transformers import AutoConfig, AutoTokenizer

import run_qwen2_audio as tool

SEVEN_B_MEMORY = "weights 8,397,094,912 params (8.40 B) x 2 B = 15.64 GiB; KV cache 512 KiB/token"


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return published_checkpoint(INSTRUCT, tmp_path_factory.mktemp("published") / INSTRUCT)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return published_checkpoint(BASE, tmp_path_factory.mktemp("published") / BASE)


def test_the_vocabulary_is_qwen2s_with_the_audio_tokens_at_their_published_ids(instruct):
    """Ids that public code records for the Qwen2 tokenizer, and the audio
    placeholder at the config's audio_token_index."""
    tokenizer = AutoTokenizer.from_pretrained(instruct)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    assert encode(" hello sir. How are you Edward?") == [
        23811,
        27048,
        13,
        2585,
        525,
        498,
        21891,
        30,
    ]
    assert encode("<|audio_bos|><|AUDIO|><|audio_eos|>") == [151647, 151646, 151648]
    assert AutoConfig.from_pretrained(instruct).audio_token_index == 151646
    # Qwen2's merges, as a public GGUF metadata dump of a Qwen2 model lists them
    # ("tokenizer.ggml.merges array<string>[151387]", code search id 54487935996).
    merges = json.loads((instruct / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == 151_387


def dry_run_cases() -> list:
    cases = [(version, where) for version in VLLM_PYTHONS for where in ("directory", "hf-cache")]
    # The image ships modelscope and the tutorial exports VLLM_USE_MODELSCOPE=True.
    return [*cases, ("vllm-0.23", "modelscope-cache")]


@pytest.mark.parametrize(("version", "where"), dry_run_cases())
def test_a_dry_run_plans_the_7b_from_its_published_files(version, where, instruct, clips, home):
    """The exact parameter count and 512 KiB of KV cache per token, the
    tutorial's chat prompt, and its tokens counted by the real vocabulary."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_USE_MODELSCOPE": "False"}
    model_flags = ["--model", instruct]
    if where == "hf-cache":
        cache_in_hugging_face_hub(instruct, home, f"Qwen/{INSTRUCT}")
        model_flags = []  # the default model, as the tutorial runs it
    if where == "modelscope-cache":
        cache_in_modelscope(instruct, home, f"Qwen/{INSTRUCT}")
        env["VLLM_USE_MODELSCOPE"] = "True"
        model_flags = []
    result = run_cli(
        *model_flags,
        "--dry-run",
        "--audio",
        clips["a.wav"],
        home=home,
        env=env,
        python=vllm_python(version),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"# memory estimate (bfloat16): {SEVEN_B_MEMORY}\n" in out
    prompt = tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, 1)
    assert "# prompt format: chat\n" in out and prompt in out
    # The text around one <|AUDIO|>, plus the 75 audio tokens of a 3 s clip.
    text_tokens = len(AutoTokenizer.from_pretrained(instruct)(prompt).input_ids) - 1
    assert f"audio tokens [75] (25/s, <= 750 per clip), prompt tokens {text_tokens + 75} " in out
    assert text_tokens == 34  # the chat markup and the default question, in Qwen2 tokens


def test_auto_tells_the_base_model_from_instruct_by_their_published_files(
    base, instruct, clips, home
):
    """The base model ships no chat template (no public copy shows one): its
    prompt is raw, the Instruct model's chat; the same 8.4 B parameters."""
    assert tool.read_model_facts(base).chat_template is False
    assert tool.read_model_facts(instruct).chat_template is True
    result = run_cli("--model", base, "--dry-run", "--audio", clips["a.wav"], home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# model profile: qwen2-audio-base\n# prompt format: raw\n" in result.stdout
    assert tool.QWEN2_AUDIO_BASE.prompt(tool.QWEN2_AUDIO.question, 1) in result.stdout
    assert SEVEN_B_MEMORY in result.stdout


def test_a_question_with_a_control_token_is_refused_before_loading(instruct, clips, home):
    """The checks before loading, on the published tokenizer: no engine
    starts (the empty weight shards would make it fail otherwise)."""
    result = run_cli(
        "--model", instruct, "--audio", clips["a.wav"], "--question", "hi<|im_end|>", home=home
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "contains the chat control token(s) <|im_end|>" in result.stderr
