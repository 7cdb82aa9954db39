"""Qwen3-ASR hears too: a tiny Qwen3-ASR trained here on espeak-ng speech
(tests/speech_model_qwen3_asr.py), in the published layout, answers utterances
it never heard through the CLI as users run it, on vLLM 0.23 (the image's)
and 0.32. One engine start per version answers a manifest of every check:
the held-out utterances as WAV, MP3 and Vorbis, the same WAVs with a forced
language, and a long recording split by the profile's long-audio path, beside
its utterances one by one.

What the random-weight checkpoint cannot show shows here: the answer's
"language English<asr_text>" head parsed off every answer and every segment
(left in, it would add two words a segment), a forced language's prompt
answered with the words alone, audio decoded or cut wrongly.
"""

from __future__ import annotations

import json

import hearing
import jiwer
import pytest
import soundfile
from helpers import (
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    QWEN3_ASR_CPU_ENV,
    read_jsonl,
    run_cli,
    tracebacks_of_ours,
    vllm_python,
)
from tiny_qwen3_asr import LANGUAGE_PREFIX
from transformers import AutoTokenizer
from whisper_normalizer.english import EnglishTextNormalizer

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine

# Issue 29's bounds: held-out WAV at most 5%, the lossy formats within 2 points.
WAV_WER = 0.05
FORMAT_POINTS = 0.02
LOSSY = ("mp3", "ogg")
# The long recording split as test_hearing.py splits it for Qwen2-Audio: at
# most 5 s a segment (one or two utterances; the most cuts). The profile's own
# 30 s segments are longer than any clip the tiny model was trained on (three
# sentences). A segment between two pauses is a clip like any other: at most
# 5%, as WAV. Where a cut falls inside an utterance (5 of the 44 here: no
# pause in the 1.7 s the splitter searches) this model loses or guesses the
# word cut in two, in every such segment on the build the bounds were read on
# (docs/testing.md, Qwen3-ASR hears too), so the whole answer is held within
# 5 points of the utterances one by one, not test_hearing.py's 3.
SPLIT_SECONDS = 5
SPLIT_POINTS = 0.05


@pytest.fixture(scope="module")
def speech(qwen3_asr_speech_model, tmp_path_factory):
    """The held-out utterances of test_hearing.py (seed 2026) in three formats,
    and its long recording (seed 2027) with its parts."""
    words = hearing.vocabulary(qwen3_asr_speech_model)
    folder = tmp_path_factory.mktemp("qwen3-asr-speech")
    heldout = hearing.utterances(words, 40, seed=2026)
    for u in heldout:
        wav = hearing.write_wav(folder / f"{u.id}.wav", u.samples)
        stereo = ("-ar", "44100", "-af", "pan=stereo|c0=c0|c1=c0")
        hearing.convert(wav, folder / f"{u.id}.mp3", *stereo)
        hearing.convert(wav, folder / f"{u.id}.ogg", *stereo, "-c:a", "libvorbis")
    parts = hearing.utterances(words, 80, seed=2027, prefix="p")
    for part in parts:
        hearing.write_wav(folder / f"{part.id}.wav", part.samples)
    talk = hearing.recording(parts, seed=2027)
    hearing.write_wav(folder / "talk.wav", talk.samples)
    return folder, heldout, parts, talk


def manifest_lines(folder, heldout, parts, talk) -> list[dict]:
    lines = [
        {"id": f"{kind}/{u.id}", "audio": str(folder / f"{u.id}.{kind}"), "reference": u.text}
        for kind in ("wav", *LOSSY)
        for u in heldout
    ]
    lines += [
        {"id": f"forced/{u.id}", "audio": str(folder / f"{u.id}.wav"), "reference": u.text,
         "language": "en"}
        for u in heldout
    ]  # fmt: skip
    lines += [
        {"id": f"one/{p.id}", "audio": str(folder / f"{p.id}.wav"), "reference": p.text}
        for p in parts
    ]
    lines.append(
        {"id": "talk", "audio": str(folder / "talk.wav"), "reference": " ".join(talk.words)}
    )
    return lines


def test_qwen3_asr_hears_every_format_a_forced_language_and_a_split_recording(
    qwen3_asr_speech_model, speech, vllm, tmp_path, home
):
    folder, heldout, parts, talk = speech
    lines = manifest_lines(folder, heldout, parts, talk)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = run_cli(
        "--model", qwen3_asr_speech_model,
        "--manifest", hearing.write_manifest(tmp_path / "jobs.jsonl", lines),
        "--output", out, "--report", report,
        "--segment-seconds", SPLIT_SECONDS,
        "--max-tokens", 64, "--no-progress", *CPU_ENGINE_FLAGS,
        home=home,
        env={**IN_PROCESS_ENGINE, **QWEN3_ASR_CPU_ENV, "HF_HUB_OFFLINE": "1"},
        python=vllm,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not tracebacks_of_ours(result.stderr)
    records = {r["id"]: r for r in read_jsonl(out)}
    assert len(records) == len(lines)
    assert not [i for i, r in records.items() if "error" in r]
    # The answer guard at its defaults: speech the model hears is never
    # asked again nor flagged.
    assert not [i for i, r in records.items() if r["fallbacks"] or "suspect" in r]

    # The model says the language it heard, then <asr_text>, then the words,
    # once an answer (a segment's, for the split one); told the language (the
    # prompt ends with it), it says the words alone. The records keep the
    # words, and the language heard or told.
    tag = AutoTokenizer.from_pretrained(qwen3_asr_speech_model).convert_tokens_to_ids(
        tool.QWEN3_ASR_TEXT_TAG
    )
    # The prompts it was trained on, as its card keeps them: the tool's.
    trained = json.loads((qwen3_asr_speech_model / "card.json").read_text())["prompt"]
    for name, record in records.items():
        forced = "English" if name.startswith("forced/") else None
        assert record["prompt"] == trained + (LANGUAGE_PREFIX if forced else "")
        answers = [
            s["token_ids"][0] for s in record.get("segments", [record]) if not s.get("silent")
        ]
        assert all(ids.count(tag) == (0 if forced else 1) for ids in answers), record
        assert record["answer_language"] == "English", record

    def wer(prefix: str, utterances) -> float:
        return hearing.word_error_rate(
            [u.text for u in utterances],
            [records[f"{prefix}/{u.id}"]["answer"] for u in utterances],
        )

    rates = {kind: wer(kind, heldout) for kind in ("wav", *LOSSY, "forced")}
    one_by_one = wer("one", parts)
    talk_record = records["talk"]
    whole = hearing.word_error_rate([" ".join(talk.words)], [talk_record["answer"]])
    segments = talk_record["segments"]
    print(
        f"{vllm}: WER " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items())
        + f"; {len(segments)} segments of <= {SPLIT_SECONDS} s: whole {whole:.1%}, "
        f"one by one {one_by_one:.1%}"
    )  # fmt: skip
    assert rates["wav"] <= WAV_WER, rates
    assert rates["forced"] <= WAV_WER, rates
    for kind in LOSSY:
        assert rates[kind] <= rates["wav"] + FORMAT_POINTS, rates

    # The recording cut into segments of at most 5 s, one after another from
    # its first sample to its last, each answered in the language it said.
    seconds = len(soundfile.read(folder / "talk.wav")[0]) / hearing.RATE
    assert all(0 < s["end"] - s["start"] <= SPLIT_SECONDS + 1e-3 for s in segments)
    assert segments[0]["start"] == 0
    assert segments[-1]["end"] == pytest.approx(seconds, abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:], strict=False))
    spoken = [s for s in segments if not s.get("silent")]
    assert all(s["answer_language"] == "English" for s in spoken), segments
    # Between two pauses, each segment says its own utterances' words: an
    # answer head left in (two words a segment), another segment's answer or
    # words out of order would fail it.
    between = [
        s
        for s in segments
        if not any(hearing.inside_an_utterance(talk, s[end]) for end in ("start", "end"))
    ]
    assert len(between) >= len(segments) / 2, "the splitter missed the pauses"
    clean = hearing.word_error_rate(
        [" ".join(hearing.words_between(talk.spans, s["start"], s["end"])) for s in between],
        [s["answers"][0] for s in between],
    )
    print(f"{len(between)} segments between pauses: {clean:.1%}")
    assert clean <= WAV_WER
    assert one_by_one <= WAV_WER
    assert whole <= one_by_one + SPLIT_POINTS

    # The tool's own corpus WER: jiwer's over its records, with Whisper's
    # English normalisation, under the language the model said (en).
    normalize = EnglishTextNormalizer()
    scored = list(records.values())
    expected = jiwer.wer(
        [normalize(r["reference"]) for r in scored], [normalize(r["answer"]) for r in scored]
    )
    score = json.loads(report.read_text())["scores"]["en"]
    assert score["scored"] == len(scored)
    assert score["wer"] == pytest.approx(expected, abs=1e-4)


def test_every_completion_of_n_is_parsed_into_its_words_and_its_language(
    qwen3_asr_speech_model, speech, tmp_path, home
):
    """--n 2 samples two answers a request: the head comes off each one, each
    says its language (answer_languages), and a split recording joins
    completion i of every segment into its answer i. What the language
    parsing does with several completions is the tool's, so vLLM 0.32 alone."""
    folder, heldout, _, talk = speech
    clips = heldout[:8]
    lines = [{"id": u.id, "audio": str(folder / f"{u.id}.wav"), "reference": u.text} for u in clips]
    lines.append({"id": "talk", "audio": str(folder / "talk.wav")})
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "--model", qwen3_asr_speech_model,
        "--manifest", hearing.write_manifest(tmp_path / "jobs.jsonl", lines),
        "--output", out, "--n", 2, "--temperature", 0.3,
        "--segment-seconds", SPLIT_SECONDS, "--max-tokens", 64, "--no-progress",
        *CPU_ENGINE_FLAGS,
        home=home,
        env={**IN_PROCESS_ENGINE, **QWEN3_ASR_CPU_ENV, "HF_HUB_OFFLINE": "1"},
        python=vllm_python("vllm-0.32"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["id"]: r for r in read_jsonl(out)}
    assert len(records) == len(lines)
    for record in records.values():
        assert len(record["answers"]) == 2 and record["answer"] == record["answers"][0]
        assert record["answer_languages"] == ["English", "English"], record
        words = " ".join(record["answers"]).split()
        assert not [w for w in words if "asr_text" in w or w == "language"], record
    segments = [s for s in records["talk"]["segments"] if not s.get("silent")]
    assert all(s["answer_languages"] == ["English", "English"] for s in segments), segments
    for i in range(2):
        joined = " ".join(a for s in segments if (a := s["answers"][i].strip()))
        assert records["talk"]["answers"][i] == joined
        # Each completion says words of its own (sampled, not bounded: at 0.3
        # the model is near its greedy answer, which the test above bounds).
        assert all(records[u.id]["answers"][i].split() for u in clips)
