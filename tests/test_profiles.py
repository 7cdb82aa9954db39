"""Model profiles (issue 29): what the tool knows about a model family sits
in one ModelProfile, chosen once from the checkpoint's config.json and
carried on the options; nothing downstream asks which model it is again."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import PUBLISHED, SCRIPT, one_error_line, run_cli

import run_qwen2_audio as tool

# What only Qwen2-Audio's profile may know: its control tokens, prompts,
# window (3000 mel frames), audio-token cap and published config.
QWEN2_AUDIO_LITERALS = (
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|im_start|>",
    "<|im_end|>",
    "You are a helpful assistant",
    "What is said in the audio",
    "Qwen2AudioForConditionalGeneration",
    "151646",
    "3000",
    "750",
)


def test_qwen2_audio_literals_appear_only_in_its_profile():
    source = SCRIPT.read_text(encoding="utf-8")
    start = source.index("# Model profiles")
    end = source.index("# --------", source.index("\n", source.index("PROFILES = (")))
    outside = source[:start] + source[end:]
    found = [literal for literal in QWEN2_AUDIO_LITERALS if literal in outside]
    assert not found, f"outside the profiles: {found}"
    assert all(literal in source[start:end] for literal in QWEN2_AUDIO_LITERALS[:-2])


def test_the_profiles_hold_the_tutorials_numbers():
    profile = tool.QWEN2_AUDIO
    assert profile.window_seconds == 30
    assert profile.max_audio_tokens == 750 and profile.audio_tokens_per_second == 25
    assert dict(profile.engine_defaults) == {
        "max_model_len": 4096,
        "max_num_seqs": 5,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.8,
    }
    # The base model's published files differ from Instruct's in the chat template alone.
    base = json.loads((PUBLISHED / "Qwen2-Audio-7B/config.json").read_text())
    base.pop("transformers_version", None)
    assert tool.QWEN2_AUDIO_BASE.published_config == base
    assert tool.QWEN2_AUDIO_BASE.prompt("Q", 2) == "<|audio_bos|><|AUDIO|><|audio_eos|>" * 2 + "Q"


def test_a_hub_id_not_on_disk_plans_with_its_own_published_config():
    base = tool.read_model_facts(None, hub_id="Qwen/Qwen2-Audio-7B")
    assert tool.choose_profile("auto", base) is tool.QWEN2_AUDIO_BASE
    assert tool.choose_profile("auto", tool.read_model_facts(None)) is tool.QWEN2_AUDIO
    # An id no profile knows: the default model's config, named as such.
    unknown = tool.read_model_facts(None, hub_id="someone/some-model")
    assert unknown.source == tool.DEFAULT_MODEL and unknown.published
    [line] = tool.memory_estimate_lines(unknown, {}, None, None)[:1]
    assert "(Qwen2-Audio-7B-Instruct's config: not on disk yet)" in line


@pytest.mark.parametrize(
    ("prompt_format", "chat_template", "expected"),
    [
        ("auto", True, "qwen2-audio-instruct"),
        ("auto", False, "qwen2-audio-base"),
        ("raw", True, "qwen2-audio-base"),
        ("chat", False, "qwen2-audio-instruct"),
    ],
)
def test_the_profile_follows_the_chat_template_unless_a_format_is_given(
    prompt_format, chat_template, expected
):
    facts = tool.dataclasses.replace(tool.read_model_facts(None), chat_template=chat_template)
    assert tool.choose_profile(prompt_format, facts).name == expected


def text_only_qwen2(tiny_model, folder):
    """A Qwen2 language model (no audio tower): a checkpoint of another model."""
    other = shutil.copytree(tiny_model, folder / "qwen2-text")
    config = json.loads((other / "config.json").read_text())
    text = {**config["text_config"], "architectures": ["Qwen2ForCausalLM"]}
    (other / "config.json").write_text(json.dumps(text))
    return other


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_checkpoint_of_another_model_is_refused_before_loading(
    dry_run, tiny_model, clips, home, tmp_path
):
    other = text_only_qwen2(tiny_model, tmp_path)
    flags = ["--dry-run"] if dry_run else []
    result = run_cli("--model", other, "--audio", clips["a.wav"], *flags, home=home)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result)
    assert f"model {other}: model_type 'qwen2' is not a model this tool runs" in line
    assert "known: qwen2_audio" in line
