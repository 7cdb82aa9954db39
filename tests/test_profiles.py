"""Model profiles (issue 29): what the tool knows about a model family sits
in one ModelProfile, chosen once from the checkpoint's config.json and
carried on the options; nothing downstream asks which model it is again."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import PUBLISHED, SCRIPT, engine_arguments, one_error_line, run_cli

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
    assert "known: qwen2_audio, qwen3_asr" in line


# --------------------------------------------------------------------------
# Qwen3-ASR: the second profile
# --------------------------------------------------------------------------


def test_qwen3_asr_is_prompted_as_vllms_own_transcription_prompts_it():
    """vllm/model_executor/models/qwen3_asr.py, get_generation_prompt (0.23
    and 0.32): a system turn only for context, the audio, and a forced
    language as the start of the answer."""
    profile = tool.QWEN3_ASR
    audio = "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n"
    assert profile.prompt("ignored", 1) == audio + "<|im_start|>assistant\n"
    assert profile.prompt("", 1, "Glossary: NPU", "English") == (
        "<|im_start|>system\nGlossary: NPU<|im_end|>\n"
        + audio
        + "<|im_start|>assistant\nlanguage English<asr_text>"
    )


@pytest.mark.parametrize(
    ("answer", "text", "language"),
    [
        ("language English<asr_text>the words", "the words", "English"),
        ("language Chinese<asr_text>你好", "你好", "Chinese"),
        ("language None<asr_text>", "", None),  # what it says of audio without speech
        ("the words", "the words", None),  # a forced language: the transcript alone
    ],
)
def test_a_qwen3_asr_answer_is_read_into_its_text_and_language(answer, text, language):
    assert tool.QWEN3_ASR.parse_answer(answer) == (text, language)
    assert tool.QWEN2_AUDIO.parse_answer(answer) == (answer, None)


def test_qwen3_asr_audio_tokens_are_13_a_second_with_no_window():
    """vLLM's _get_feat_extract_output_lengths on a clip's mel frames."""
    seconds = {1: 13, 3: 39, 30: 390, 40: 520, 300: 3900}
    assert {s: tool.qwen3_asr_tokens(s * 16000) for s in seconds} == seconds
    assert tool.qwen3_asr_tokens(16000 + 160) == 14  # one frame into the next second
    assert tool.QWEN3_ASR.max_audio_tokens == 3900  # under vLLM's CPU encoder cache, 4096
    assert tool.QWEN3_ASR.default_segment_seconds == 30  # vLLM's transcription chunk


def test_a_qwen3_asr_hub_id_plans_with_its_published_config():
    facts = tool.read_model_facts(None, hub_id="Qwen/Qwen3-ASR-1.7B")
    assert tool.choose_profile("auto", facts) is tool.QWEN3_ASR
    # Qwen3 1.7B: 28 layers x 8 KV heads x 128 x K and V; the audio encoder
    # and the tied embeddings make the ~2.0 B parameters the model card states.
    assert facts.kv_values_per_token == 28 * 8 * 128 * 2
    assert 1.9e9 < facts.parameters < 2.1e9


def test_an_explicit_engine_flag_wins_even_when_it_equals_a_profiles_default():
    """--max-num-seqs 5 is Qwen2-Audio's default; given for Qwen3-ASR (whose
    profile leaves it to vLLM) it must still reach the engine."""
    parser = tool.build_parser()
    given = tool.engine_flags(parser.parse_args(["--max-num-seqs", "5"]), parser)
    assert given == {"max_num_seqs": 5}
    kwargs = tool.engine_kwargs(profile=tool.QWEN3_ASR, **given)
    assert kwargs["max_num_seqs"] == 5 and kwargs["max_model_len"] == 4096
    assert "max_num_seqs" not in tool.engine_kwargs(profile=tool.QWEN3_ASR)
    assert tool.engine_flags(parser.parse_args([]), parser) == {}


def qwen3_asr_request(**fields) -> tool.PreparedRequest:
    options = tool.Options(profile=tool.QWEN3_ASR)
    return tool.prepare_request(tool.AudioRequest(id="r", **fields), options, None)


def test_qwen3_asr_requests_it_cannot_take_fail_alone_and_say_why(clips):
    two = qwen3_asr_request(audio=[str(clips["a.wav"])] * 2)
    assert "2 clips in one prompt, but qwen3-asr takes 1" in str(two.error)
    swahili = qwen3_asr_request(audio=[str(clips["a.wav"])], language="sw")
    assert "language 'sw' is not one qwen3-asr can be told to transcribe" in str(swahili.error)
    french = qwen3_asr_request(audio=[str(clips["a.wav"])], language="fr", question="What?")
    assert french.error is None and french.forced_language == "French"
    assert french.prompt.endswith("language French<asr_text>")
    assert ["request r: question not used (qwen3-asr only transcribes; context for it "
            "goes in the system prompt)"] == french.warnings  # fmt: skip


def test_qwen3_asr_is_told_a_language_without_its_region(clips):
    """A manifest's "en-US" is checked and lower-cased when read; the model
    knows languages, not regions. Filipino is one of its 30."""
    audio = [str(clips["a.wav"])]
    assert qwen3_asr_request(audio=audio, language="en-us").forced_language == "English"
    assert qwen3_asr_request(audio=audio, language="fil").forced_language == "Filipino"
    assert qwen3_asr_request(audio=audio, language="EN_gb").forced_language == "English"
    line = '{"id": "x", "audio": "a.wav", "language": "en-US"}'
    assert tool.parse_manifest_line(line, 1, clips["a.wav"].parent).language == "en-us"


def test_chinese_of_a_region_with_two_spoken_languages_must_say_which(clips):
    """zh-HK names how Chinese is written in Hong Kong, not what is spoken there:
    forcing Mandarin on Cantonese speech would be a silent error."""
    audio = [str(clips["a.wav"])]
    for code in ("zh-HK", "zh_mo", "zh-Hant-HK"):
        error = str(qwen3_asr_request(audio=audio, language=code).error)
        assert "Cantonese and Mandarin are both spoken" in error
        assert "yue (Cantonese) or zh (Mandarin)" in error
    assert qwen3_asr_request(audio=audio, language="zh-yue").forced_language == "Cantonese"
    assert qwen3_asr_request(audio=audio, language="zh-CN").forced_language == "Chinese"
    # Only Chinese has a language subtag here: "de-fil" is German of no region.
    assert qwen3_asr_request(audio=audio, language="de-fil").forced_language == "German"
    # Written Chinese of any region is scored per character, as before.
    assert tool.metric_for("zh-hk") == tool.metric_for("zh-yue") == "cer"


def test_the_cli_refuses_chinese_of_hong_kong_alone_and_runs_cantonese(
    qwen3_asr_model, clips, home, tmp_path
):
    manifest = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "hk", "audio": str(clips["a.wav"]), "language": "zh-HK", "reference": "你好"},
        {"id": "yue", "audio": str(clips["a.wav"]), "language": "yue"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli("--model", qwen3_asr_model, "--manifest", manifest, "--dry-run", home=home)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hk: language 'zh-hk'" in errors[0], result.stderr[-3000:]
    assert "say which" not in errors[0] and "yue (Cantonese) or zh (Mandarin)" in errors[0]
    assert "# request yue\n" in result.stdout
    assert "language Cantonese<asr_text>" in result.stdout


def stand_in_attempt(*answers: str) -> tool.Attempt:
    """An attempt answered by a stand-in for vLLM's RequestOutput."""
    completions = [
        SimpleNamespace(text=text, token_ids=[1, 2], finish_reason="stop") for text in answers
    ]
    output = SimpleNamespace(outputs=completions, prompt_token_ids=[0] * 10)
    return tool.Attempt(output=output, temperature=0.0)


def answered(prepared: tool.PreparedRequest, *answers: str) -> dict:
    """The record of prepared answered with these completions."""
    return tool.result_record(prepared, [stand_in_attempt(*answers)], {}, completions=len(answers))


def test_each_completion_keeps_the_language_it_states(clips):
    prepared = qwen3_asr_request(audio=[str(clips["a.wav"])])
    record = answered(
        prepared, "language English<asr_text>one two", "language German<asr_text>eins zwei"
    )
    assert record["answers"] == ["one two", "eins zwei"]
    assert record["answer_language"] == "English"
    assert record["answer_languages"] == ["English", "German"]
    single = answered(prepared, "language German<asr_text>eins zwei")
    assert single["answer_language"] == "German" and "answer_languages" not in single
    silent = answered(prepared, "language None<asr_text>", "language None<asr_text>")
    assert silent["answer_language"] is None and silent["answer_languages"] == [None, None]


def test_a_split_recording_states_the_language_of_its_first_segment_that_states_one(clips):
    prepared = qwen3_asr_request(audio=[str(clips["a.wav"])], reference="eins zwei drei")
    prepared.split = True
    prepared.segments = [tool.Segment([np.zeros(16000)], 0.0, 1.0, silent=True),
                         tool.Segment([np.zeros(16000)], 1.0, 2.0),
                         tool.Segment([np.zeros(16000)], 2.0, 3.0)]  # fmt: skip
    outputs = [
        tool.Attempt(output=None, temperature=0.0),
        stand_in_attempt("language None<asr_text>", "language None<asr_text>"),
        stand_in_attempt("language German<asr_text>eins zwei drei", "language English<asr_text>x"),
    ]
    record = tool.result_record(prepared, outputs, {}, completions=2)
    assert record["answer_languages"] == ["German", "English"]
    assert [s.get("answer_languages") for s in record["segments"]] == [
        None, [None, None], ["German", "English"]]  # fmt: skip
    assert record["language"] == "de" and record["wer"] == 0.0


def test_failed_requests_without_a_language_count_as_unstated_not_english(clips):
    """A Qwen3-ASR request that failed was heard in no language: its reference
    counts apart, not under English beside the answered ones' detected language."""
    report = tool.RunReport()
    broken = qwen3_asr_request(audio=["/no/such.wav"], reference="你好")
    assert broken.error is not None
    report.add(tool.error_record(broken))
    heard = qwen3_asr_request(audio=[str(clips["a.wav"])], reference="你好")
    report.add(answered(heard, "language Chinese<asr_text>你好"))
    assert report.scores["zh"].scored == 1 and report.scores[tool.UNSTATED].failed == 1
    assert "en" not in report.scores
    qwen2 = tool.prepare_request(
        tool.AudioRequest(id="q", audio=["/no/such.wav"], reference="hi"), tool.Options(), None
    )
    assert tool.error_record(qwen2)["language"] == "en"


def test_a_reference_without_a_language_is_scored_in_the_one_the_model_heard(clips):
    audio = [str(clips["a.wav"])]
    chinese = answered(
        qwen3_asr_request(audio=audio, reference="你好世界"), "language Chinese<asr_text>你好世"
    )
    assert chinese["language"] == "zh" and chinese["cer"] == 0.25
    told = answered(qwen3_asr_request(audio=audio, reference="ni hao", language="en"), "ni hao")
    assert told["language"] == "en" and told["wer"] == 0.0
    unsure = answered(qwen3_asr_request(audio=audio, reference="a b"), "language None<asr_text>")
    assert unsure["language"] == "en" and unsure["wer"] == 1.0


def test_the_smaller_qwen3_asr_plans_with_the_larger_ones_config_and_says_so():
    facts = tool.read_model_facts(None, hub_id="Qwen/Qwen3-ASR-0.6B")
    assert tool.choose_profile("auto", facts) is tool.QWEN3_ASR
    [line] = tool.memory_estimate_lines(facts, {}, None, None)[:1]
    assert "(Qwen3-ASR-1.7B's config: not on disk yet)" in line


def test_the_tutorial_on_qwen3_asr_sends_one_clip(qwen3_asr_model, demo_assets_cache, home):
    """No inputs: the tutorial's demo, with the one clip a Qwen3-ASR prompt takes."""
    env = {"VLLM_ASSETS_CACHE": str(demo_assets_cache)}
    result = run_cli("--model", qwen3_asr_model, "--dry-run", home=home, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# model profile: qwen3-asr" in result.stdout
    assert result.stdout.count("<|audio_pad|>") == 1
    assert engine_arguments(result.stdout)["limit_mm_per_prompt"] == {"audio": 1}
    assert "question not used" not in result.stdout  # the demo asks none of it
    two = run_cli("--model", qwen3_asr_model, "--audio-count", "2", home=home, env=env)
    assert "--audio-count 2: qwen3-asr takes 1 clip(s) in a prompt; use --audio-count 1" in (
        one_error_line(two)
    )


def test_qwen3_asr_plans_with_a_transformers_that_does_not_know_it(
    qwen3_asr_model, clips, monkeypatch, capsys
):
    """transformers has Qwen3-ASR from 5.13; vLLM 0.23 brings its own config
    and processor, so an image's older transformers must not stop the run:
    the text model's numbers plan the KV cache, the tokenizer counts."""
    from transformers.models.auto import configuration_auto

    monkeypatch.delitem(configuration_auto.CONFIG_MAPPING_NAMES, "qwen3_asr")
    assert not tool.transformers_knows("qwen3_asr")
    facts = tool.read_model_facts(qwen3_asr_model)
    assert tool.choose_profile("auto", facts) is tool.QWEN3_ASR
    assert facts.kv_values_per_token == 2 * 1 * 64 * 2 and facts.parameters is None
    assert (
        tool.main(["--model", str(qwen3_asr_model), "--audio", str(clips["a.wav"]), "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "audio tokens [39]" in out and "prompt tokens" in out
    assert "weights unknown (transformers cannot build this checkpoint's model)" in out
