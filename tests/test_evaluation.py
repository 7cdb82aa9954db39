"""Answers scored against references, as Qwen2-Audio's own evaluation does:
WER (CER for zh/yue/ja/ko/th) from jiwer on Whisper-normalised text, per
record and per language over the corpus, errors counted apart; and the base
model's raw prompt, token for token as transformers runs it."""

from __future__ import annotations

import json
import re

import jiwer
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    PAUSES,
    base_model_copy,
    load_json_output,
    one_error_line,
    read_jsonl,
    run_cli,
    speech_like,
)
from reference import transformers_greedy_ids
from transformers import AutoTokenizer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

import run_qwen2_audio as tool

MAX_TOKENS = 8
CHARACTER_LANGUAGES = ("zh", "yue", "ja", "ko", "th")


def normalised(text: str, language: str) -> str:
    """The evaluation's normalisation, restated: <|tags|> out, English through
    Whisper's English normaliser then the basic one, every other language
    through the basic one, spaces dropped where characters are scored."""
    text = re.sub(r"<\|[^|]*\|>", " ", text)
    primary = language.lower().split("-")[0]
    if primary == "en":
        text = EnglishTextNormalizer()(text)
    words = BasicTextNormalizer()(text).split()
    return "".join(words) if primary in CHARACTER_LANGUAGES else " ".join(words)


def jiwer_rate(references: list[str], answers: list[str], language: str) -> float:
    refs = [normalised(r, language) for r in references]
    hyps = [normalised(a, language) for a in answers]
    by_character = language.split("-")[0] in CHARACTER_LANGUAGES
    return jiwer.cer(refs, hyps) if by_character else jiwer.wer(refs, hyps)


PAIRS = [
    (
        "en",
        "Mary had a little lamb, its fleece was white as snow.",
        "mary had a lamb white as snow",
    ),
    ("en", "Mr. Smith paid $20 for two colours.", "Mister Smith paid 20 dollars for 2 colors"),
    ("en-US", "It's a home run!", "<|en|>it is a home run"),
    ("de", "Die Straße ist naß.", "die strasse ist nass"),
    ("zh", "你好，世界！", "你好 世 介"),
    ("zh-CN", "今天天气很好", "今天天气"),
    ("ja", "こんにちは、世界", "こんにちは世界です"),
    ("ko", "안녕 하세요", "안녕하세요"),
]


@pytest.mark.parametrize(("language", "reference", "answer"), PAIRS)
def test_each_record_scores_what_jiwer_gives_on_the_normalised_text(language, reference, answer):
    score = tool.score_answer(answer, reference, tool.check_language(language, "test"))
    assert score["reference_normalized"] == normalised(reference, language)
    assert score["answer_normalized"] == normalised(answer, language)
    expected = jiwer_rate([reference], [answer], language)
    assert score["edits"] / score["reference_units"] == pytest.approx(expected)
    assert score["metric"] == ("cer" if language[:2] in CHARACTER_LANGUAGES else "wer")
    parts = score["substitutions"] + score["deletions"] + score["insertions"]
    assert parts == score["edits"]


@pytest.mark.parametrize(("language", "reference", "answer"), PAIRS)
def test_a_reference_equal_to_the_answer_scores_zero(language, reference, answer):
    assert tool.score_answer(reference, reference, language)["edits"] == 0
    # Punctuation and spacing are not errors (nor is case: see the English test).
    respaced = "  " + reference.replace(" ", "   ").replace(",", " , ") + " ?!"
    assert tool.score_answer(respaced, reference, language)["edits"] == 0


def test_english_goes_through_the_english_then_the_basic_normaliser():
    score = tool.score_answer("MISTER Smith paid 20", "Mr. Smith paid $20.", "en")
    assert score["reference_normalized"] == "mister smith paid 20"
    assert score["edits"] == 0


def test_an_empty_answer_is_all_deletions():
    score = tool.score_answer("", "red green blue", "en")
    assert (score["edits"], score["deletions"], score["reference_units"]) == (3, 3, 3)


def test_a_reference_of_punctuation_only_is_not_scored():
    assert tool.score_answer("anything", "?!", "en") is None


def test_corpus_rate_is_total_edits_over_total_words_with_errors_apart():
    report = tool.RunReport()
    pairs = [("red green blue black", "red green blue black"), ("white", "grey pink")]
    for reference, answer in pairs:
        score = tool.score_answer(answer, reference, "en")
        report.add({"reference": reference, "language": "en", "score": score, **RECORD})
    report.add({"reference": "eight", "language": "en", "error": {"message": "bad clip"}})
    corpus = report.summary()["scores"]["en"]
    # 2 edits over 5 words (0.4), not the mean of 0 and 2 (1.0).
    assert corpus["wer"] == pytest.approx(jiwer.wer(*map(list, zip(*pairs, strict=True)))) == 0.4
    assert (corpus["scored"], corpus["failed"]) == (2, 1)


RECORD = {"audio_seconds": 1.0, "prompt_tokens": 1, "output_tokens": 1}


@pytest.mark.parametrize("code", ["en", "EN-us", "zh_CN", "yue", "pt-BR"])
def test_language_codes_are_bcp47_like(code):
    assert tool.check_language(code, "here") == code.lower().replace("_", "-")


@pytest.mark.parametrize("code", ["english", "xx", "", "-en", "zh/cn"])
def test_unknown_language_codes_are_refused_with_the_fix(code):
    with pytest.raises(tool.ExplainedError, match="ISO 639-1 code such as en, zh"):
        tool.check_language(code, "here")


def manifest_with_references(folder, clips, same_reference: str) -> list[dict]:
    return [
        {"id": "same", "audio": str(clips["a.wav"]), "reference": same_reference},
        {"id": "en", "audio": str(clips["c.flac"]), "reference": "Mary had a little lamb."},
        {"id": "zh", "audio": str(clips["b.mp3"]), "reference": "你好，世界", "language": "zh-CN"},
        {"id": "plain", "audio": str(clips["d.ogg"])},
        {"id": "missing", "audio": str(folder / "missing.wav"), "reference": "gone"},
        {"id": "number", "audio": str(clips["a.wav"]), "reference": 42},
        {"id": "spelled", "audio": str(clips["a.wav"]), "reference": "x", "language": "english"},
    ]


@pytest.mark.engine
def test_manifest_references_score_records_and_corpus(tiny_model, clips, home, tmp_path, vllm):
    # The answer transformers gives for "same" is its reference: WER 0.
    prompt = tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, 1)
    samples = [tool.load_clip(str(clips["a.wav"]), tool.Options()).samples]
    _, ids = transformers_greedy_ids(tiny_model, prompt, samples, MAX_TOKENS)
    same = AutoTokenizer.from_pretrained(tiny_model).decode(ids, skip_special_tokens=True)
    # vLLM holds back a character whose bytes are not all generated yet (the
    # tiny model's random tokens can end mid-character): so does the answer.
    same = same.rstrip("\ufffd")
    assert normalised(same, "en"), "the tiny model's answer must have words to score"
    manifest = tmp_path / "refs.jsonl"
    lines = manifest_with_references(tmp_path, clips, same)
    manifest.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    out, report_path = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = run_cli(
        "--model",
        tiny_model,
        "--manifest",
        manifest,
        "--output",
        out,
        "--report",
        report_path,
        "--temperature",
        "0",
        "--max-tokens",
        MAX_TOKENS,
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        home=home,
        env=IN_PROCESS_ENGINE,
        python=vllm,
    )
    assert result.returncode == 1, result.stderr[-3000:]  # some requests failed
    records = {r["id"]: r for r in read_jsonl(out)}

    assert records["same"]["answer"] == same
    assert records["same"]["wer"] == 0
    for name, language, metric in (("en", "en", "wer"), ("zh", "zh-cn", "cer")):
        record = records[name]
        assert record["language"] == language
        expected = jiwer_rate([record["reference"]], [record["answer"]], language)
        assert record[metric] == pytest.approx(expected, abs=1e-4)
    assert not {"reference", "wer", "cer", "score"} & set(records["plain"])
    assert "no such file" in records["missing"]["error"]["message"]
    assert '"reference" must be a string' in records["number"]["error"]["message"]
    assert "'english' is not a language code" in records["spelled"]["error"]["message"]

    scores = json.loads(report_path.read_text())["scores"]
    answered = [records["same"], records["en"]]
    corpus_en = jiwer_rate(
        [r["reference"] for r in answered], [r["answer"] for r in answered], "en"
    )
    assert scores["en"]["wer"] == pytest.approx(corpus_en, abs=1e-4)
    assert (scores["en"]["scored"], scores["en"]["failed"]) == (2, 1)  # "missing" apart
    assert scores["zh-cn"]["cer"] == records["zh"]["cer"]
    assert re.search(r"^WER en: [\d.]+% \(\d+ edits / \d+ reference words\)", result.stderr, re.M)


@pytest.mark.engine
def test_resumed_run_reports_the_corpus_of_the_whole_output(tiny_model, clips, home, tmp_path):
    manifest = tmp_path / "refs.jsonl"
    lines = manifest_with_references(tmp_path, clips, "a b c")[:3]
    manifest.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    out, first, second = tmp_path / "out.jsonl", tmp_path / "1.json", tmp_path / "2.json"
    common = ["--model", tiny_model, "--manifest", manifest, "--output", out]
    common += ["--temperature", "0", "--max-tokens", MAX_TOKENS, *CPU_ENGINE_FLAGS, *ASK_ONCE]
    env = IN_PROCESS_ENGINE
    assert run_cli(*common, "--report", first, home=home, env=env).returncode == 0
    kept = [line for line in out.read_text().splitlines() if '"id": "same"' not in line]
    out.write_text("\n".join(kept) + "\n")  # as if stopped before "same" was written
    resumed = run_cli(*common, "--resume", "--report", second, home=home, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 ok, 0 failed, 2 skipped" in resumed.stderr
    assert json.loads(second.read_text())["scores"] == json.loads(first.read_text())["scores"]


QUESTION = "Detect the language and recognize the speech: <|en|>"


@pytest.mark.engine
def test_raw_prompt_matches_transformers(tiny_model, clips, home, vllm):
    paths = [clips["c.flac"], clips["a.wav"]]
    result = run_cli(
        "--model",
        tiny_model,
        "--audio",
        *paths,
        "--prompt-format",
        "raw",
        "--question",
        QUESTION,
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
    raw = "<|audio_bos|><|AUDIO|><|audio_eos|><|audio_bos|><|AUDIO|><|audio_eos|>" + QUESTION
    assert record["prompt"] == raw
    samples = [tool.load_clip(str(p), tool.Options()).samples for p in paths]
    prompt_tokens, ids = transformers_greedy_ids(tiny_model, raw, samples, MAX_TOKENS)
    assert record["prompt_tokens"] == prompt_tokens
    assert record["token_ids"] == [ids]


def test_raw_prompts_are_split_budgeted_and_checked_like_chat_ones(tiny_model, tmp_path):
    talk = tmp_path / "talk.wav"
    soundfile.write(talk, speech_like(75, PAUSES), 16000)
    options = tool.Options(profile=tool.QWEN2_AUDIO_BASE)
    count = tool.load_tokenizer_counter(tiny_model, trust_remote_code=False)
    request = tool.AudioRequest(id="talk", audio=[str(talk)], question=QUESTION)
    prepared = tool.prepare_request(request, options, count)
    assert prepared.error is None and prepared.prompt == tool.qwen2_audio_raw_prompt(QUESTION, 1)
    assert len(prepared.segments) == 3  # split at the pauses, as with chat
    text = count(prepared.prompt) - 1
    assert prepared.prompt_tokens == [
        text + tool.qwen2_audio_tokens(len(s.clips[0])) for s in prepared.segments
    ]
    tight = tool.Options(profile=tool.QWEN2_AUDIO_BASE, max_model_len=prepared.prompt_tokens[0])
    assert "prompt needs" in str(tool.prepare_request(request, tight, count).error)
    sneaky = tool.AudioRequest(id="x", audio=[str(talk)], question="hi<|im_end|>")
    assert "chat control token" in str(tool.prepare_request(sneaky, options, count).error)


def test_auto_prompt_format_is_raw_for_a_checkpoint_without_chat_template(
    tiny_model, clips, home, tmp_path
):
    base = base_model_copy(tiny_model, tmp_path)
    assert tool.choose_profile("auto", tool.read_model_facts(tiny_model)) is tool.QWEN2_AUDIO
    assert tool.choose_profile("auto", tool.read_model_facts(base)) is tool.QWEN2_AUDIO_BASE
    not_downloaded = tool.read_model_facts(None)  # the default model's published config
    assert tool.choose_profile("auto", not_downloaded) is tool.QWEN2_AUDIO
    base_not_downloaded = tool.read_model_facts(None, hub_id="Qwen/Qwen2-Audio-7B")
    assert tool.choose_profile("auto", base_not_downloaded) is tool.QWEN2_AUDIO_BASE
    result = run_cli(
        "--model", base, "--audio", clips["b.mp3"], "--question", QUESTION, "--dry-run", home=home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# prompt format: raw\n" in result.stdout
    raw = "<|audio_bos|><|AUDIO|><|audio_eos|>" + QUESTION
    assert f"\n{raw}\n" in result.stdout
    # The budget counts the raw prompt as the processor does: text + 25 per s.
    text = len(AutoTokenizer.from_pretrained(base)(raw, add_special_tokens=False).input_ids) - 1
    assert f"prompt tokens {text + 125} of max_model_len 4096" in result.stdout


def test_references_without_the_scoring_packages_fail_before_the_engine(
    tiny_model, clips, home, tmp_path
):
    """As in an image where `pip install -r requirements.txt` was not run."""
    hidden = tmp_path / "without-jiwer"
    hidden.mkdir()
    (hidden / "jiwer.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'jiwer'\", name='jiwer')\n"
    )
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text(json.dumps({"id": "x", "audio": str(clips["a.wav"]), "reference": "hi"}))
    result = run_cli(
        "--model",
        tiny_model,
        "--manifest",
        manifest,
        home=home,
        env={"PYTHONPATH": str(hidden)},
    )
    error = one_error_line(result)
    assert "need jiwer and whisper-normalizer (jiwer is not installed)" in error
    assert "pip install -r requirements.txt" in error
