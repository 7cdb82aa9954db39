"""The tool hears: a tiny Qwen2-Audio trained here on espeak-ng speech
(tests/speech_model.py) answers utterances it never heard, run through the CLI
as users run it, and the answers are scored against the words spoken.

A defect that keeps shapes passes every random-weight test and fails here:
audio resampled at the wrong rate, a segment offset off by a second, a word
cut or doubled at a split point, one request's answer under another's id in a
busy batch, clips swapped in a prompt.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import random
import signal
from functools import partial
from pathlib import Path

import hearing
import jiwer
import numpy as np
import pytest
import soundfile
import soxr
import srt
from helpers import (
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    SCRIPT,
    HeldAudioServer,
    assert_each_id_once,
    local_http_server,
    read_jsonl,
    run_cli,
    start,
    tracebacks_of_ours,
    vllm_python,
    wait_for_lines,
    whole_records,
)
from whisper_normalizer.english import EnglishTextNormalizer

import run_qwen2_audio as tool

pytestmark = pytest.mark.engine

# Bounds. Issue 20's where this model meets them; where it does not, the
# measured figure and a bound above it (docs/testing.md, "How we know it hears"):
# the model's own held-out WER (card.json) is 2.9%, 0.6% on one sentence.
WAV_WER = 0.05
FORMAT_POINTS = 0.02  # every format within 2 points of the 16 kHz WAV
# Reported, not bounded: what the model never heard in training. Telephone
# audio lacks what it heard above 4 kHz; espeak-ng speaks near full scale and
# Whisper's log-mel features are not level-invariant, so the same WAV 3, 6
# and 12 dB down loses words (the model's limit: the tool passes samples as
# they are). A trial build trained at levels down to -30 dB was flat across
# them but lost 5 points at full scale: the tiny model cannot hold both.
REPORTED = ("wav-8k-telephone", "wav-3db-down", "wav-6db-down", "wav-12db-down")
# Several clips in one prompt: what the model does with them varies by build
# (measured per clip 23.6%, 15.1% and, on a cold build of 2026-12-04, 32.1%:
# clips 2 and 3 lose their first word), and transformers, fed the same
# samples, makes the same choices (checked): a bound on the model's hearing
# of the clips at all, not on this build's figure.
SEVERAL_CLIPS_WER = 0.50
# Long audio split at 5 s (segments of one or two utterances; the most cuts):
# the whole answer within 3 points of the same utterances one by one.
SPLIT_SECONDS = 5
SPLIT_POINTS = 0.03
# Subtitles at 10 s, issue 20's bound there. Segments of ~4 utterances (~17
# words), where the model itself drops or repeats words: measured 9.6% on the
# long recording against 0.0% one by one, 9.7% over the cues of it and eight
# ~60 s recordings, whose whole answers score 8.0-15.6% (reported: one is
# above 15%); transformers answers the same on the same samples.
SUBTITLE_SECONDS = 10  # within the 11 s clips the model was trained on
SEGMENT_WER = 0.15
OFFLINE = {**IN_PROCESS_ENGINE, "HF_HUB_OFFLINE": "1"}


def run_speech_model(
    model: Path, home: Path, *args: str | Path, python: str, env=OFFLINE, timeout: float = 600
):
    """The CLI on the speech model, greedy, answers long enough for any clip."""
    return run_cli(
        "--model",
        model,
        *args,
        "--temperature",
        "0",
        "--max-tokens",
        "48",
        "--no-progress",
        *CPU_ENGINE_FLAGS,
        home=home,
        env=env,
        python=python,
        timeout=timeout,
    )


def answers_by_id(path: Path) -> dict[str, str]:
    records = read_jsonl(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id answered twice"
    errors = [r for r in records if "error" in r]
    assert not errors, errors[:3]
    # The answer guard at its defaults: speech the model hears is never asked
    # again nor flagged (its answers' mean log-probability: -0.11 at worst).
    alarms = [r["id"] for r in records if r["fallbacks"] or "suspect" in r]
    assert not alarms, alarms[:5]
    return {r["id"]: r["answer"] for r in records}


def word_edits(references: list[str], answers: list[str]) -> int:
    """Word edits turning the answers into the references, pair by pair."""
    return round(
        sum(len(r.split()) for r in references) * hearing.word_error_rate(references, answers)
    )


def plain_wer(utterances: list[hearing.Utterance], answers: dict[str, str], prefix: str) -> float:
    return hearing.word_error_rate(
        [u.text for u in utterances], [answers[f"{prefix}{u.id}"] for u in utterances]
    )


# --------------------------------------------------------------------------
# Held-out speech as users' files
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout(speech_model: Path) -> list[hearing.Utterance]:
    return hearing.utterances(hearing.vocabulary(speech_model), 40, seed=2026)


def write_variants(folder: Path, utterance: hearing.Utterance) -> dict[str, Path]:
    """One utterance in every format a user might hand over."""
    wav = hearing.write_wav(folder / f"{utterance.id}.wav", utterance.samples)
    stereo44 = np.stack([utterance.samples] * 2, axis=1)
    stereo44 = soxr.resample(stereo44, hearing.RATE, 44100).astype(np.float32)
    # Both channels the mono signal at its own level (ffmpeg's own upmix is
    # 3 dB down: a level test, reported apart).
    stereo = ("-ar", "44100", "-af", "pan=stereo|c0=c0|c1=c0")
    made = {
        "wav": wav,
        "mp3": hearing.convert(wav, folder / f"{utterance.id}.mp3", *stereo),
        "ogg-44k-stereo": hearing.convert(
            wav, folder / f"{utterance.id}.ogg", *stereo, "-c:a", "libvorbis"
        ),
        "flac-48k-24bit": folder / f"{utterance.id}.flac",
        "wav-44k-stereo-float": folder / f"{utterance.id}-float.wav",
        "wav-8k-telephone": folder / f"{utterance.id}-8k.wav",
    }
    samples48 = soxr.resample(utterance.samples, hearing.RATE, 48000)
    soundfile.write(made["flac-48k-24bit"], samples48, 48000, subtype="PCM_24")
    soundfile.write(made["wav-44k-stereo-float"], stereo44, 44100, subtype="FLOAT")
    samples8 = soxr.resample(utterance.samples, hearing.RATE, 8000)
    soundfile.write(made["wav-8k-telephone"], samples8, 8000, subtype="PCM_16")
    for down in (3, 6, 12):
        made[f"wav-{down}db-down"] = hearing.write_wav(
            folder / f"{utterance.id}-{down}db.wav", utterance.samples * 10 ** (-down / 20)
        )
    return made


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_every_format_is_heard_and_several_clips_answer_in_order(
    vllm, speech_model, heldout, tmp_path, home
):
    """Every format and http on the current vLLM; on both, the WAVs and prompts of
    several clips, answered in the clips' order."""
    folder = tmp_path / "audio"
    folder.mkdir()
    variants = {u.id: write_variants(folder, u) for u in heldout}
    formats = list(variants[heldout[0].id])
    fetched = ["http"]
    if vllm != vllm_python("vllm-0.32"):
        # Reading a file format or a URL is the tool's own code, the same
        # under either engine: on vLLM 0.23 the 16 kHz WAVs and the prompts
        # of several clips, the engine's part (0.23 gave the same answers on
        # every format while both ran them all, docs/testing.md).
        formats, fetched = ["wav"], []
    # Several clips in one prompt: two or three utterances, then the same reversed.
    groups = [heldout[i : i + 2] for i in range(0, 8, 2)]
    groups += [heldout[i : i + 3] for i in range(8, 23, 3)]
    with local_http_server(partial(Files, directory=str(folder))) as base:
        lines = []
        for name in formats:
            for u in heldout:
                line = {"id": f"{name}/{u.id}", "audio": str(variants[u.id][name])}
                if name not in REPORTED:  # outside the tool's corpus WER
                    line["reference"] = u.text
                lines.append(line)
        lines += [
            {"id": f"{name}/{u.id}", "audio": f"{base}/{u.id}.wav", "reference": u.text}
            for name in fetched
            for u in heldout
        ]
        for k, group in enumerate(groups):
            paths = [str(variants[u.id]["wav"]) for u in group]
            lines.append({"id": f"several/{k}", "audio": paths})
            lines.append({"id": f"reversed/{k}", "audio": paths[::-1]})
        out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
        result = run_speech_model(
            speech_model,
            home,
            "--manifest",
            hearing.write_manifest(tmp_path / "jobs.jsonl", lines),
            "--output",
            out,
            "--report",
            report,
            python=vllm,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not tracebacks_of_ours(result.stderr)
    answers = answers_by_id(out)
    assert len(answers) == len(lines)

    rates = {name: plain_wer(heldout, answers, f"{name}/") for name in formats + fetched}
    print(f"{vllm}: WER by format " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    assert rates["wav"] <= WAV_WER, rates
    for name in rates:
        if name not in REPORTED:
            assert rates[name] <= rates["wav"] + FORMAT_POINTS, (name, rates)

    # The tool's own corpus WER: the same number jiwer gives over its records
    # (Whisper's English normalisation, as the tool documents), and low.
    records = [r for r in read_jsonl(out) if "reference" in r]
    normalize = EnglishTextNormalizer()
    expected = jiwer.wer(
        [normalize(r["reference"]) for r in records], [normalize(r["answer"]) for r in records]
    )
    tool_score = json.loads(report.read_text())["scores"]["en"]
    assert tool_score["scored"] == len(records)
    assert tool_score["wer"] == pytest.approx(expected, abs=1e-4)
    assert tool_score["wer"] <= WAV_WER, tool_score

    # Each clip's words in clip order, joined by " | " (card.json's format);
    # reversed clips, reversed answers.
    for kind, order in (("several", 1), ("reversed", -1)):
        references, hypotheses, whole = [], [], 0
        for k, group in enumerate(groups):
            spoken = [u.text for u in group[::order]]
            parts = answers[f"{kind}/{k}"].split("|")
            if len(parts) == len(group):
                whole += 1
                # In order: no other order of the clips fits the parts better
                # (a part the model got wrong fits no clip, and decides nothing).
                in_order = word_edits(spoken, parts)
                best = min(word_edits(list(p), parts) for p in itertools.permutations(spoken))
                assert in_order == best, (kind, k, spoken, parts)
            parts += [""] * (len(group) - len(parts))  # a missing clip: all its words lost
            references += spoken
            hypotheses += parts[: len(group)]
        rate = hearing.word_error_rate(references, hypotheses)
        print(f"{vllm}: {kind} clips, WER per clip {rate:.1%}, {whole}/{len(groups)} whole")
        # Measured 7/9 and 9/9 whole: a part can be lost with a clip boundary.
        assert whole >= len(groups) // 2, (
            kind,
            [answers[f"{kind}/{k}"] for k in range(len(groups))],
        )
        assert rate <= SEVERAL_CLIPS_WER, (kind, rate)
        # The words lost are the model's: transformers, teacher forced on the
        # clips the tool sent (the WAVs' own samples), in the order sent,
        # prefers no other token by more than a near-tie.
        for count in (2, 3):
            ks = [k for k, group in enumerate(groups) if len(group) == count]
            pieces = [
                [soundfile.read(variants[u.id]["wav"], dtype="float32")[0] for u in groups[k]][
                    ::order
                ]
                for k in ks
            ]
            prompt = tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, count)
            said = [answers[f"{kind}/{k}"] for k in ks]
            differences = greedy_in_transformers(speech_model, prompt, pieces, said)
            assert all(margin <= NEAR_TIE for *_, margin in differences), (kind, differences)


# --------------------------------------------------------------------------
# Long audio: split at pauses, no word lost or doubled at a cut
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_recording(speech_model: Path, tmp_path_factory) -> tuple[Path, hearing.Recording, list]:
    """Over 3 minutes of held-out utterances with 0.3-1.5 s gaps, and its parts."""
    parts = hearing.utterances(hearing.vocabulary(speech_model), 80, seed=2027, prefix="p")
    recording = hearing.recording(parts, seed=2027)
    assert len(recording.samples) / hearing.RATE >= 180
    folder = tmp_path_factory.mktemp("long")
    (folder / "parts").mkdir()
    (folder / "talk").mkdir()
    for part in parts:
        hearing.write_wav(folder / "parts" / f"{part.id}.wav", part.samples)
    path = hearing.write_wav(folder / "talk" / "talk.wav", recording.samples)
    return path, recording, parts


# vLLM and transformers compute in float32 with other kernels: their logits
# differ in the last bits, so where the trained model's two best tokens are
# this close, greedy decoding may go either way. Other audio moves choices by
# more: segments moved by 0.3 s gave margins up to 1.1, by 1 s up to 15 (by
# 40 ms: 0.05, not detectable). On the samples sent, no token differed on two
# builds (docs/testing.md, "Any model the builder makes"); cut at the reported
# millisecond times, cues had near-ties up to 0.12 on one build, 0.38 on another.
NEAR_TIE = 0.25


def segments_the_tool_sends(path: Path, seconds: float) -> list[tuple[float, float, np.ndarray]]:
    """(start, end, samples) of each segment the CLI sends for a recording split
    at `seconds`: the file decoded by the tool's own decoder (checked to be the
    16-bit file's samples as soundfile reads them), cut by its own splitter,
    silent stretches left out as it leaves them out. The records and cues give
    times rounded to milliseconds (up to 8 samples off): these are exact."""
    clip = tool.decode_to_16k_mono(str(path), str(path))
    samples, rate = soundfile.read(path, dtype="float32")
    assert rate == hearing.RATE and np.array_equal(clip.samples, samples)
    sent = []
    for segment in tool.split_segments(clip, seconds, tool.SILENCE_DB):
        if segment.silent:
            continue
        begin, end = segment.start_seconds, segment.end_seconds
        # Each piece is the file's samples between its own times, not the
        # splitter's word for it: the CLI reports these times.
        piece = samples[round(begin * hearing.RATE) : round(end * hearing.RATE)]
        assert np.array_equal(segment.clips[0], piece), (path.name, begin, end)
        sent.append((begin, end, piece))
    return sent


def answers_of_segments(reported: list[tuple[float, float, str]], sent: list[tuple]) -> list[str]:
    """Each sent segment's answer, from what the CLI reported as (start, end,
    text) with times to the millisecond: every report is one sent segment's,
    in order; a segment with no report (no cue: the answer was empty) is "".
    """
    answers, left = [], list(reported)
    for begin, end, _ in sent:
        if left and left[0][:2] == pytest.approx((begin, end), abs=1e-3):
            answers.append(left.pop(0)[2])
        else:
            answers.append("")
    assert not left, ("reported times that are no segment's", left, [s[:2] for s in sent])
    return answers


def greedy_in_transformers(model: Path, prompt: str, pieces: list, answers: list[str]) -> list:
    """Each answer scored by transformers on the same samples (a piece: one
    clip, or a list of the clips of one prompt) and prompt, teacher
    forced: the tokens where transformers' greedy choice differs, with the margin
    by which it preferred its own. The CLI answered from exactly those samples
    if every margin is a near-tie."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model)
    network = Qwen2AudioForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    differences = []
    for index, (piece, answer) in enumerate(zip(pieces, answers, strict=True)):
        audio = piece if isinstance(piece, list) else [piece]  # one clip, or several
        inputs = processor(
            text=prompt, audio=audio, sampling_rate=hearing.RATE, return_tensors="pt"
        )
        chosen = processor.tokenizer(answer, add_special_tokens=False).input_ids + [eos]
        ids = torch.cat([inputs["input_ids"], torch.tensor([chosen])], dim=1)
        with torch.no_grad():
            logits = network.eval()(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                input_features=inputs["input_features"],
                feature_attention_mask=inputs["feature_attention_mask"],
            ).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
        for step, token in enumerate(chosen):
            margin = (logits[step].max() - logits[step, token]).item()
            if margin > 0:
                differences.append((index, step, round(margin, 4)))
    return differences


def cuts_in_an_utterance_beside_a_pause(
    recording: hearing.Recording, starts: list[float], limit: float
) -> tuple[list[float], int]:
    """The splitter's promise, checked against the spoken spans: the segment
    that starts at starts[k] ends (starts[k + 1]) in the pause between two
    utterances whenever one (>= 0.2 s: longer than espeak-ng's pauses between
    words) lies in the window it searches, the last third of the segment
    (run_qwen2_audio.split_points). Returns the cuts that broke it, and how
    many cuts had no such pause within reach (such a cut may fall inside an
    utterance, in the longest pause between its words)."""
    gaps = [(a.end, b.start) for a, b in zip(recording.spans, recording.spans[1:], strict=False)]
    broken, out_of_reach = [], 0
    for begin, cut in zip(starts, starts[1:], strict=False):
        high = begin + limit
        low = high - min(tool.SPLIT_SEARCH_SECONDS, limit / 3)
        if not any(min(b, high) - max(a, low) >= 0.2 for a, b in gaps):
            out_of_reach += 1
        elif hearing.inside_an_utterance(recording, cut):
            broken.append(cut)
    return broken, out_of_reach


def test_long_audio_split_at_pauses_loses_and_doubles_no_word(
    speech_model, long_recording, tmp_path, home
):
    path, recording, parts = long_recording
    lines = [
        {
            "id": f"one/{p.id}",
            "audio": str(path.parent.parent / "parts" / f"{p.id}.wav"),
            "reference": p.text,
        }
        for p in parts
    ]
    lines.append({"id": "talk", "audio": str(path), "reference": " ".join(recording.words)})
    out = tmp_path / "out.jsonl"
    result = run_speech_model(
        speech_model,
        home,
        "--manifest",
        hearing.write_manifest(tmp_path / "jobs.jsonl", lines),
        "--output",
        out,
        "--long-audio",
        "split",
        "--segment-seconds",
        str(SPLIT_SECONDS),
        python=vllm_python("vllm-0.32"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = answers_by_id(out)
    one_by_one = plain_wer(parts, answers, "one/")
    whole = hearing.word_error_rate([" ".join(recording.words)], [answers["talk"]])
    talk = next(r for r in read_jsonl(out) if r["id"] == "talk")
    segments = talk["segments"]
    starts = [s["start"] for s in segments]
    samples = soundfile.read(path, dtype="float32")[0]
    broken, between_words = cuts_in_an_utterance_beside_a_pause(recording, starts, SPLIT_SECONDS)
    print(
        f"{len(samples) / hearing.RATE:.0f} s in {len(segments)} segments of <= {SPLIT_SECONDS} s: "
        f"WER whole {whole:.1%}, one by one {one_by_one:.1%}; {between_words} of "
        f"{len(segments) - 1} cuts had no pause between utterances within reach"
    )
    assert all(0 < s["end"] - s["start"] <= SPLIT_SECONDS + 1e-3 for s in segments)
    # One after another from the first sample to the last: no audio left out.
    assert segments[0]["start"] == 0
    assert segments[-1]["end"] == pytest.approx(len(samples) / hearing.RATE, abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:], strict=False))
    # Segments this short cannot always end between utterances (the 1.7 s
    # the splitter searches can lie inside one); where a pause between two
    # utterances was within reach, the cut is in it.
    assert not broken, broken
    # Each segment answered from exactly its own samples: transformers, given
    # the same samples and prompt, says the same (an offset, a lost or doubled
    # piece of audio, another segment's answer would differ).
    sent = segments_the_tool_sends(path, SPLIT_SECONDS)
    assert len(sent) == len(segments)
    reported = [(s["start"], s["end"], s["answers"][0]) for s in segments]
    differences = greedy_in_transformers(
        speech_model,
        talk["prompt"],
        [piece for *_, piece in sent],
        answers_of_segments(reported, sent),
    )
    print(f"tokens transformers would have chosen otherwise (segment, step, margin): {differences}")
    assert all(margin <= NEAR_TIE for *_, margin in differences), differences
    # The whole answer scores as the utterances one by one do, within 3 points
    # (issue 20): about 10 of ~360 words, so a word lost or doubled at every
    # fourth of the 44 cuts would fail it.
    assert one_by_one <= WAV_WER
    assert whole <= one_by_one + SPLIT_POINTS


@pytest.fixture(scope="module")
def recordings_to_subtitle(
    long_recording, speech_model: Path, tmp_path_factory
) -> tuple[Path, dict[str, hearing.Recording]]:
    """A folder of recordings, by file name: the long one, and issue 20's
    check eight times over (~60 s of 25 utterances, its own seed each)."""
    path, recording, _ = long_recording
    folder = tmp_path_factory.mktemp("to-subtitle")
    made = {"talk.wav": recording}
    hearing.write_wav(folder / "talk.wav", recording.samples)
    for seed in range(7100, 7108):
        parts = hearing.utterances(
            hearing.vocabulary(speech_model), 25, seed=seed, prefix=f"m{seed}-"
        )
        lead = random.Random(seed).uniform(0.1, 1.5)
        made[f"minute-{seed}.wav"] = hearing.recording(parts, seed=seed, lead=lead)
        hearing.write_wav(folder / f"minute-{seed}.wav", made[f"minute-{seed}.wav"].samples)
    return folder, made


def test_subtitle_cues_hold_the_words_spoken_between_their_times(
    speech_model, recordings_to_subtitle, tmp_path, home
):
    folder, recordings = recordings_to_subtitle
    directory = tmp_path / "subtitles"
    result = run_speech_model(
        speech_model,
        home,
        "--audio-dir",
        folder,
        "--output-dir",
        directory,
        "--output-format",
        "srt",
        "--segment-seconds",
        str(SUBTITLE_SECONDS),
        python=vllm_python("vllm-0.23"),  # the image's vLLM
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, 1)
    spoken_all, cues_all, wholes, margins = [], [], {}, []
    for name, recording in recordings.items():
        cues = list(srt.parse((directory / f"{name}.srt").read_text()))  # named after its id
        times = [(c.start.total_seconds(), c.end.total_seconds()) for c in cues]
        spoken = [" ".join(hearing.words_between(recording.spans, a, b)) for a, b in times]
        spoken_all += spoken
        cues_all += [c.content for c in cues]
        wholes[name] = hearing.word_error_rate(
            [" ".join(recording.words)], [" ".join(c.content for c in cues)]
        )
        seconds = len(recording.samples) / hearing.RATE
        assert len(cues) >= seconds // SUBTITLE_SECONDS, name
        broken, _ = cuts_in_an_utterance_beside_a_pause(
            recording, [a for a, _ in times], SUBTITLE_SECONDS
        )
        assert not broken, (name, broken)
        sent = segments_the_tool_sends(folder / name, SUBTITLE_SECONDS)
        reported = [(a, b, c.content) for (a, b), c in zip(times, cues, strict=True)]
        differences = greedy_in_transformers(
            speech_model, prompt, [piece for *_, piece in sent], answers_of_segments(reported, sent)
        )
        margins += [margin for *_, margin in differences]
        assert all(margin <= NEAR_TIE for *_, margin in differences), (name, differences)
    rate = hearing.word_error_rate(spoken_all, cues_all)
    print(
        f"{len(cues_all)} cues: WER against the words between their times {rate:.1%}; "
        "whole recordings: "
        + ", ".join(f"{k} {v:.1%}" for k, v in wholes.items())
        + f"; transformers chose otherwise at {len(margins)} tokens, margins {sorted(margins)}"
    )
    assert rate <= SEGMENT_WER
    assert wholes["talk.wav"] <= SEGMENT_WER


# --------------------------------------------------------------------------
# A busy batch: every answer under its own id, killed and resumed too
# --------------------------------------------------------------------------

BUSY = 500
# The answers one at a time are the reference for every fourth utterance:
# a batch that moved answers between ids, or changed them, shows there (all
# 500 were measured the same, docs/testing.md), at a quarter of the cost.
SERIAL_EVERY = 4
MISPLACED = 0.5  # an answer's WER against its own id's words above which it is not its own


def test_a_busy_batch_answers_each_id_with_its_own_words_even_killed_and_resumed(
    speech_model, tmp_path, home
):
    speech = hearing.utterances(hearing.vocabulary(speech_model), BUSY, seed=2028, prefix="b")
    folder = tmp_path / "audio"
    folder.mkdir()
    for u in speech:
        hearing.write_wav(folder / f"{u.id}.wav", u.samples)

    def write_manifest(name: str, utterances: list, extra: list[dict]) -> Path:
        lines = [
            {"id": u.id, "audio": str(folder / f"{u.id}.wav"), "reference": u.text}
            for u in utterances
        ]
        return hearing.write_manifest(tmp_path / f"{name}-jobs.jsonl", lines + extra)

    python = vllm_python("vllm-0.32")
    sampled = speech[::SERIAL_EVERY]
    serial_out = tmp_path / "serial.jsonl"
    serial = run_speech_model(
        speech_model,
        home,
        "--manifest",
        write_manifest("serial", sampled, []),
        "--output",
        serial_out,
        "--max-num-seqs",
        "1",
        python=python,
        timeout=1200,  # requests one at a time, beside another test on two cores
    )
    assert serial.returncode == 0, serial.stderr[-3000:]
    one_at_a_time = answers_by_id(serial_out)

    busy_out = tmp_path / "busy.jsonl"
    with HeldAudioServer() as held:
        # The held request comes last: the run cannot end before the kill.
        manifest = write_manifest("busy", speech, [{"id": "zz-held", "audio": held.url}])
        argv = [
            python,
            str(SCRIPT),
            "--model",
            str(speech_model),
            "--manifest",
            str(manifest),
            "--output",
            str(busy_out),
            "--max-num-seqs",
            "64",
            "--chunk-size",
            "128",
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            "--no-progress",
            "--url-timeout",
            "3600",
            "--resume",
            *CPU_ENGINE_FLAGS,
        ]
        assert not busy_out.exists()
        with open(tmp_path / "busy.stderr", "wb") as log:
            proc = start(argv, home, OFFLINE, stderr=log)
        try:
            wait_for_lines(proc, busy_out, BUSY // 3)
        finally:  # also when the wait fails: no run left behind on the machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        kept = whole_records(busy_out, torn_tail=True)
        held.release()
        resumed = run_cli(*argv[2:], home=home, env=OFFLINE, python=python)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_each_id_once(busy_out, [u.id for u in speech] + ["zz-held"], kept=kept)
    busy = answers_by_id(busy_out)
    busy.pop("zz-held")
    assert set(busy) == {u.id for u in speech}
    assert set(one_at_a_time) == {u.id for u in sampled}
    same = sum(busy[i] == one_at_a_time[i] for i in one_at_a_time)
    # Every id, sampled or not, holds its own words: an answer filed under
    # another id misses most of this id's words (utterances of 3-6 words).
    misplaced = [
        u.id for u in speech if hearing.word_error_rate([u.text], [busy[u.id]]) > MISPLACED
    ]
    serial_wer = plain_wer(sampled, one_at_a_time, "")
    sampled_busy_wer = plain_wer(sampled, busy, "")
    busy_wer = plain_wer(speech, busy, "")
    print(
        f"{BUSY} utterances busy: WER {busy_wer:.1%}; the {len(sampled)} also one at a time: "
        f"WER {serial_wer:.1%} there, {sampled_busy_wer:.1%} busy, same answer "
        f"{same}/{len(sampled)}; {len(misplaced)} answers off their own words by over "
        f"{MISPLACED:.0%}"
    )
    assert serial_wer <= WAV_WER
    assert busy_wer <= WAV_WER
    assert len(misplaced) <= 0.02 * BUSY, misplaced[:10]
    assert sampled_busy_wer <= serial_wer + 0.01
    assert same >= 0.98 * len(sampled)


# --------------------------------------------------------------------------
# Silence is not sent
# --------------------------------------------------------------------------

SILENCE_SECONDS = 40.0
NOISE_FLOOR_DB = -60.0  # a quiet room's: white noise at this RMS level


def test_silent_stretches_are_not_sent_and_the_speech_around_them_is_heard(
    speech_model, long_recording, tmp_path, home
):
    """Three runs of four utterances with 40 s of digital silence, then 40 s
    of a noise floor, between them, split at 10 s: the segments inside the
    silence are answered "" without the engine, get no cue, and the words
    around them are heard as well as elsewhere."""
    _, _, parts = long_recording
    rng = np.random.default_rng(2029)
    noise = rng.standard_normal(round(SILENCE_SECONDS * hearing.RATE)) * 10 ** (NOISE_FLOOR_DB / 20)
    fillers = [np.zeros(round(SILENCE_SECONDS * hearing.RATE)), noise, None]
    pieces, spans, quiet, at = [], [], [], 0.0
    for index, filler in enumerate(fillers):
        run = hearing.recording(parts[4 * index : 4 * index + 4], seed=2029 + index)
        pieces.append(run.samples)
        spans += [hearing.Span(at + s.start, at + s.end, s.words) for s in run.spans]
        at += len(run.samples) / hearing.RATE
        if filler is not None:
            pieces.append(filler.astype(np.float32))
            quiet.append((at, at + SILENCE_SECONDS))
            at += SILENCE_SECONDS
    path = hearing.write_wav(tmp_path / "pauses.wav", np.concatenate(pieces))
    words = [w for span in spans for w in span.words]
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    lines = [{"id": "pauses", "audio": str(path), "reference": " ".join(words)}]
    result = run_speech_model(
        speech_model, home,
        "--manifest", hearing.write_manifest(tmp_path / "jobs.jsonl", lines),
        "--output", out, "--report", report, "--segment-seconds", str(SUBTITLE_SECONDS),
        python=vllm_python("vllm-0.23"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers_by_id(out)  # no error, no alarm
    [record] = read_jsonl(out)
    segments = record["segments"]
    silent = [s for s in segments if s.get("silent")]

    def speech_in(segment: dict) -> float:
        return sum(
            max(0.0, min(segment["end"], s.end) - max(segment["start"], s.start)) for s in spans
        )

    # A segment without speech is silent, one with a word's worth (0.1 s) is
    # heard; each 40 s stretch holds several silent ones.
    times = [(s["start"], s["end"], s.get("silent", False), speech_in(s)) for s in segments]
    for _, _, is_silent, speech in times:
        assert is_silent == (speech == 0) or 0 < speech < 0.1, times
    for begin, end in quiet:
        assert sum(begin <= s["start"] and s["end"] <= end for s in silent) >= 3, times
    assert all(s["answers"] == [""] and s["prompt_tokens"] == 0 for s in silent)
    summary = json.loads(report.read_text())
    assert summary["silent_segments"] == len(silent)
    assert f"{len(silent)} silent segment(s) not sent" in result.stderr
    # Every cue holds speech: none lies in the silence.
    for begin, end, _ in tool.cues(record):
        assert any(min(end, s.end) > max(begin, s.start) for s in spans), (begin, end)
    wer = hearing.word_error_rate([" ".join(words)], [record["answer"]])
    print(
        f"{len(silent)} silent segments of {len(segments)}; WER {wer:.1%} over {len(words)} words"
    )
    assert wer <= SEGMENT_WER
