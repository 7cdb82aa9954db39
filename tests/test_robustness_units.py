"""Robustness of the batch core, without an engine: the engine feeder against
a fake engine (requests finishing out of order, refused, forgotten or cut
off, a consumer that stops early, two feeders on one engine), long-audio
splitting, manifest sources and URLs, downloads cut short or trickling,
scoring of scripts with combining marks, and stdout on a full disk. The
properties of splitting and of manifests over any input are in test_fuzz.py."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import ROOT, local_http_server, speech_like, tone
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError

import run_qwen2_audio as tool

RATE = tool.SAMPLE_RATE
BASE = Path("/data")


# --------------------------------------------------------------------------
# A fake engine: the part of vLLM's LLMEngine that the feeder drives
# --------------------------------------------------------------------------


@dataclasses.dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclasses.dataclass
class FakeOutput:
    request_id: str
    finished: bool
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


def fake_answer(prompt: dict[str, Any]) -> str:
    """What the fake model says: the clip named in the question and how much
    audio it was given, so an answer handed to the wrong request shows."""
    name = re.search(r"Which clip is (\S+)\?", prompt["prompt"]).group(1)
    audio = prompt["multi_modal_data"]["audio"]
    assert all(rate == RATE for _, rate in audio)
    return f"{name}:{sum(len(samples) for samples, _ in audio) / RATE:.2f}s"


def asks_about(name: str):
    return lambda prompt: f"Which clip is {name}?" in prompt["prompt"]


def has_audio(samples: np.ndarray):
    """The prompt of the segment whose audio is this very array."""
    return lambda prompt: prompt["multi_modal_data"]["audio"][0][0] is samples


class FakeEngine:
    """Finishes one running request per step: the oldest ("fifo") or the
    newest ("lifo"), and reports the others as unfinished. Until add_request
    has been called hold_until times it finishes nothing (so every request is
    in before the first one finishes, whatever the decode threads' timing).
    refuse(prompt) gives the exception add_request raises; forget(prompt)
    makes it accept a request and silently lose it; cut_off(prompt) finishes
    it at max_tokens (finish_reason "length"); fail(prompt) finishes it
    with finish_reason "error" and no tokens, as vLLM does for a request
    that failed inside the engine."""

    def __init__(
        self,
        order: str = "fifo",
        hold_until: int = 0,
        refuse=None,
        forget=None,
        cut_off=None,
        fail=None,
        max_steps: int = 1000,
    ) -> None:
        self.model_config = SimpleNamespace(model="/no/such/checkpoint")
        self.order, self.hold_until, self.max_steps = order, hold_until, max_steps
        self.refuse = refuse or (lambda prompt: None)
        self.forget = forget or (lambda prompt: False)
        self.cut_off = cut_off or (lambda prompt: False)
        self.fail = fail or (lambda prompt: False)
        self.running: dict[str, tuple[dict[str, Any], Any]] = {}
        self.ids: list[str] = []  # every id add_request was given
        self.params: list[Any] = []
        self.sent: list[tuple[dict[str, Any], Any]] = []  # (prompt, params) of each call
        self.aborted: list[str] = []
        self.finished: list[tuple[str, str]] = []  # (who stepped, answer)
        self.stepper = ""  # set by a test that interleaves two consumers
        self.calls = self.steps = self.holds = 0

    def add_request(self, request_id: str, prompt: dict[str, Any], params: Any) -> None:
        self.calls += 1
        self.ids.append(request_id)
        self.params.append(params)
        self.sent.append((prompt, params))
        problem = self.refuse(prompt)
        if problem is not None:
            raise problem
        if not self.forget(prompt):
            self.running[request_id] = (prompt, params)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def step(self) -> list[FakeOutput]:
        if self.calls < self.hold_until:
            self.holds += 1
            assert self.holds < 20_000, "held for 20 s: fewer requests came than expected"
            time.sleep(0.001)  # lets a decode thread hand over the next request
            return []
        self.steps += 1
        if self.steps > self.max_steps:
            raise AssertionError(f"stepped {self.max_steps} times: the feeder waits for ever")
        if not self.running:
            return []
        request_id = list(self.running)[0 if self.order == "fifo" else -1]
        prompt, params = self.running.pop(request_id)
        text = fake_answer(prompt)
        self.finished.append((self.stepper, text))
        cut = self.cut_off(prompt)
        completion = FakeCompletion(
            text, list(range(params.max_tokens if cut else 3)), "length" if cut else "stop"
        )
        if self.fail(prompt):
            completion = FakeCompletion("", [], "error")
        done = FakeOutput(request_id, True, list(range(10)), [completion])
        return [*(FakeOutput(i, False, [], []) for i in self.running), done]


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()


class FakeLLM:
    """What answer_requests needs of a vllm.LLM."""

    def __init__(self, engine: FakeEngine) -> None:
        self.llm_engine = engine

    def generate(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("answer_requests drives the engine step by step")

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()


# A 25 s recording with two pauses: --segment-seconds 10 cuts it in each.
LONG_PAUSES = [(9.0, 9.6), (18.4, 19.0)]
OPTIONS = tool.Options(profile=tool.QWEN2_AUDIO, segment_seconds=10, chunk_size=16)
# Clip r<i> is 1 + i/10 s long, so the fake answer for it is "r<i>:1.<i>0s".
SHORT = [f"r{i}" for i in range(6)]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wavs")
    for i, name in enumerate(SHORT):
        soundfile.write(folder / f"{name}.wav", tone(1 + i / 10, RATE, 200 + 50 * i), RATE)
    soundfile.write(folder / "long.wav", speech_like(25, LONG_PAUSES), RATE)
    return folder


def prepare(wavs: Path, name: str) -> tool.PreparedRequest:
    request = tool.AudioRequest(
        id=name, audio=[str(wavs / f"{name}.wav")], question=f"Which clip is {name}?"
    )
    prepared = tool.prepare_request(request, OPTIONS, None)
    assert prepared.error is None, prepared.error
    return prepared


def answer(engine: FakeEngine, requests: list[tool.PreparedRequest]) -> list[dict[str, Any]]:
    params = SamplingParams(temperature=0, max_tokens=8)
    return list(tool.answer_requests(FakeLLM(engine), requests, params, OPTIONS))


def segment_answers(prepared: tool.PreparedRequest, skip: int | None = None) -> str:
    """The fake answers of a split request's segments joined in order."""
    return " ".join(
        f"long:{s.end_seconds - s.start_seconds:.2f}s"
        for i, s in enumerate(prepared.segments)
        if i != skip
    )


def segment_name(prepared: tool.PreparedRequest, i: int) -> str:
    s = prepared.segments[i]
    return (
        f"segment {i + 1} of {len(prepared.segments)} [{s.start_seconds:.2f}-{s.end_seconds:.2f} s]"
    )


def test_the_long_recording_is_cut_in_its_two_pauses(wavs):
    """Precondition of the split tests below: 3 segments, cut in the pauses."""
    long = prepare(wavs, "long")
    assert len(long.segments) == 3
    for segment, (start, end) in zip(long.segments[1:], LONG_PAUSES, strict=True):
        assert start <= segment.start_seconds <= end


# --------------------------------------------------------------------------
# The engine feeder
# --------------------------------------------------------------------------


def test_records_come_in_request_order_with_their_own_answers_whatever_order_they_finish(wavs):
    engine = FakeEngine(order="lifo", hold_until=len(SHORT))
    params = SamplingParams(temperature=0, max_tokens=8)
    requests = [prepare(wavs, name) for name in SHORT]
    records = list(tool.answer_requests(FakeLLM(engine), requests, params, OPTIONS))
    expected = ["r0:1.00s", "r1:1.10s", "r2:1.20s", "r3:1.30s", "r4:1.40s", "r5:1.50s"]
    assert [text for _, text in engine.finished] == expected[::-1]  # the engine went backwards
    assert [r["id"] for r in records] == SHORT
    assert [r["answer"] for r in records] == expected
    assert all("error" not in r and "warnings" not in r for r in records)
    # The engine gets a copy asking for final outputs only; the caller's is untouched.
    assert {p.output_kind for p in engine.params} == {RequestOutputKind.FINAL_ONLY}
    assert params.output_kind != RequestOutputKind.FINAL_ONLY


def test_a_segment_the_engine_refuses_costs_that_segment_only(wavs):
    """The 2nd of 3 segments is refused after the 1st was sent: the request
    keeps the other two answers, in order, and names the refused one."""
    requests = [prepare(wavs, "r0"), prepare(wavs, "long"), prepare(wavs, "r1")]
    long = requests[1]
    refused = has_audio(long.segments[1].clips[0])
    engine = FakeEngine(
        refuse=lambda p: ValueError("prompt too long (fake)") if refused(p) else None
    )
    records = answer(engine, requests)

    assert [r["id"] for r in records] == ["r0", "long", "r1"]
    assert [records[0]["answer"], records[2]["answer"]] == ["r0:1.00s", "r1:1.10s"]
    record = records[1]
    assert "error" not in record
    assert record["answer"] == segment_answers(long, skip=1)
    assert [s.get("error", {}).get("type") for s in record["segments"]] == [
        None,
        "engine_rejected",
        None,
    ]
    assert "prompt too long (fake)" in record["segments"][1]["error"]["message"]
    assert record["warnings"] == [
        f"request long {segment_name(long, 1)}: the engine refused it (prompt too long (fake))"
    ]


def test_a_request_whose_every_segment_is_refused_is_an_error_record_and_the_next_goes_on(wavs):
    requests = [prepare(wavs, "long"), prepare(wavs, "r1")]
    refused = asks_about("long")
    engine = FakeEngine(refuse=lambda p: ValueError("bad audio (fake)") if refused(p) else None)
    records = answer(engine, requests)
    assert [r["id"] for r in records] == ["long", "r1"]
    assert records[0]["error"]["type"] == "engine_rejected"
    assert "the engine refused it (bad audio (fake))" in records[0]["error"]["message"]
    assert records[1]["answer"] == "r1:1.10s"


def test_an_unexpected_exception_from_add_request_is_that_requests_internal_error(wavs):
    requests = [prepare(wavs, name) for name in SHORT[:3]]
    broken = asks_about("r1")
    engine = FakeEngine(refuse=lambda p: RuntimeError("kaputt") if broken(p) else None)
    records = answer(engine, requests)
    assert [r["id"] for r in records] == ["r0", "r1", "r2"]
    assert records[1]["error"]["type"] == "internal_error"
    assert "RuntimeError: kaputt" in records[1]["error"]["message"]
    assert [records[0]["answer"], records[2]["answer"]] == ["r0:1.00s", "r2:1.20s"]


def test_a_request_that_failed_inside_the_engine_is_an_error_not_an_empty_answer(wavs):
    """vLLM finishes a request whose preprocessing failed in the engine core
    with finish_reason "error" and no tokens: that is no answer."""
    requests = [prepare(wavs, name) for name in SHORT[:3]]
    engine = FakeEngine(fail=asks_about("r1"))
    records = answer(engine, requests)
    assert records[1]["error"]["type"] == "engine_error"
    assert "the engine failed on it (finished with error)" in records[1]["error"]["message"]
    assert [records[0]["answer"], records[2]["answer"]] == ["r0:1.00s", "r2:1.20s"]


def test_vllms_validation_error_is_a_refusal_on_every_version(wavs):
    """vLLM 0.23's VLLMValidationError is a ValueError, 0.32's is not (a
    VLLMClientError): both are the engine refusing the prompt."""
    from vllm.exceptions import VLLMValidationError

    broken = asks_about("r1")
    engine = FakeEngine(refuse=lambda p: VLLMValidationError("too long") if broken(p) else None)
    records = answer(engine, [prepare(wavs, name) for name in SHORT[:3]])
    assert records[1]["error"]["type"] == "engine_rejected"
    assert "the engine refused it (too long" in records[1]["error"]["message"]


def test_a_dead_engine_ends_the_run_instead_of_failing_one_request(wavs):
    """EngineDeadError is not one request's problem: it propagates (exit 70)."""
    engine = FakeEngine(refuse=lambda p: EngineDeadError())
    with pytest.raises(EngineDeadError):
        answer(engine, [prepare(wavs, "r0")])


def test_a_consumer_that_stops_early_leaves_nothing_running(wavs):
    engine = FakeEngine(order="fifo", hold_until=4)
    params = SamplingParams(temperature=0, max_tokens=8)
    requests = [prepare(wavs, name) for name in SHORT[:4]]
    records = tool.answer_requests(FakeLLM(engine), requests, params, OPTIONS)
    assert next(records)["answer"] == "r0:1.00s"
    still_running = set(engine.running)
    assert len(still_running) == 3  # r1, r2, r3
    records.close()
    assert sorted(engine.aborted) == sorted(still_running)
    assert engine.running == {}


def test_two_consumers_on_one_engine_get_every_record_with_their_own_answers(wavs):
    """Two answer_requests generators on one engine, read alternately: one's
    step() also collects the other's finished outputs, which must reach
    their owner; engine request ids never collide."""
    # Holding until A's 3 requests are in makes B's first step finish A's r1.
    engine = FakeEngine(order="fifo", hold_until=3)
    llm = FakeLLM(engine)
    params = SamplingParams(temperature=0, max_tokens=8)
    consumers = {
        "a": tool.answer_requests(llm, [prepare(wavs, n) for n in SHORT[:3]], params, OPTIONS),
        "b": tool.answer_requests(llm, [prepare(wavs, n) for n in SHORT[3:]], params, OPTIONS),
    }
    got: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for _ in range(3):
        for name, records in consumers.items():
            engine.stepper = name
            got[name].append(next(records))
    for name, records in consumers.items():
        engine.stepper = name
        assert next(records, None) is None
    assert ("b", "r1:1.10s") in engine.finished  # an output taken by the other feeder
    assert len(engine.ids) == len(set(engine.ids)) == 6
    assert [(r["id"], r["answer"]) for r in got["a"]] == [
        ("r0", "r0:1.00s"),
        ("r1", "r1:1.10s"),
        ("r2", "r2:1.20s"),
    ]
    assert [(r["id"], r["answer"]) for r in got["b"]] == [
        ("r3", "r3:1.30s"),
        ("r4", "r4:1.40s"),
        ("r5", "r5:1.50s"),
    ]


def test_a_request_the_engine_no_longer_has_is_an_error_not_a_wait_for_ever(wavs):
    """The engine accepts r1 and then loses it (aborted by someone else): r1
    never finishes and the engine has nothing left; the feeder must not step
    for ever (the fake engine raises after 1000 steps)."""
    engine = FakeEngine(forget=asks_about("r1"))
    records = answer(engine, [prepare(wavs, name) for name in SHORT[:3]])
    assert [r["id"] for r in records] == ["r0", "r1", "r2"]
    assert records[1]["error"]["type"] == "internal_error"
    assert "the engine no longer has it" in records[1]["error"]["message"]
    assert [records[0]["answer"], records[2]["answer"]] == ["r0:1.00s", "r2:1.20s"]


def test_an_answer_cut_off_at_max_tokens_is_flagged_and_counted(wavs):
    requests = [prepare(wavs, "r0"), prepare(wavs, "long"), prepare(wavs, "r1")]
    long = requests[1]
    short_cut, long_cut = asks_about("r0"), has_audio(long.segments[1].clips[0])
    engine = FakeEngine(cut_off=lambda p: short_cut(p) or long_cut(p))
    records = answer(engine, requests)

    assert records[0]["truncated"] is True and records[0]["finish_reason"] == "length"
    assert records[0]["warnings"] == [
        "request r0: answer cut off at max_tokens (8 tokens); raise --max-tokens for the "
        "whole answer"
    ]
    s = long.segments[1]
    assert records[1]["truncated"] is True
    assert records[1]["warnings"] == [
        "request long: answer cut off at max_tokens (8 tokens) in segment 2 "
        f"[{s.start_seconds:.2f}-{s.end_seconds:.2f} s]; raise --max-tokens for the whole answer"
    ]
    assert records[1]["answer"] == segment_answers(long)  # all of it, cut-off part included
    assert "truncated" not in records[2] and "warnings" not in records[2]

    report = tool.RunReport(requests=3)
    for record in records:
        report.add(record)
    assert (report.ok, report.truncated) == (3, 2)
    assert (
        "warning: 2 answer(s) cut off at --max-tokens (see their warnings); raise "
        "--max-tokens for whole answers"
    ) in report.lines()


def test_a_truncated_clips_cue_ends_where_the_model_stopped_hearing(tmp_path):
    """--long-audio truncate sends the first 10 s of a 12 s clip: the record
    says so (heard_seconds) and its subtitle cue ends at 10 s, not 12 s."""
    soundfile.write(tmp_path / "cut.wav", speech_like(12, []), RATE)
    request = tool.AudioRequest("cut", [str(tmp_path / "cut.wav")], "Which clip is cut?")
    options = dataclasses.replace(OPTIONS, long_audio="truncate")
    prepared = tool.prepare_request(request, options, None)
    [record] = answer(FakeEngine(), [prepared])
    assert (record["clip_seconds"], record["heard_seconds"]) == ([12.0], [10.0])
    assert tool.cues(record) == [(0.0, 10.0, "cut:10.00s")]


def test_a_split_clip_with_a_silent_segment_keeps_the_times_of_the_one_heard(tmp_path):
    # 27 s of silence, then 5 s of speech: the cut falls in the middle of the
    # silence inside the 25-30 s search window, at 26 s; 0-26 s is silent,
    # answered "" without the engine, and gets no cue.
    samples = np.concatenate([np.zeros(27 * RATE, np.float32), speech_like(5, [])])
    soundfile.write(tmp_path / "late.wav", samples, RATE)
    request = tool.AudioRequest("late", [str(tmp_path / "late.wav")], "Which clip is late?")
    prepared = tool.prepare_request(request, tool.Options(profile=tool.QWEN2_AUDIO), None)
    assert [(s.start_seconds, s.end_seconds, s.silent) for s in prepared.segments] == [
        (0.0, 26.0, True),
        (26.0, 32.0, False),
    ]
    engine = FakeEngine()
    [record] = answer(engine, [prepared])
    assert len(engine.ids) == 1  # the silent segment never reached the engine
    assert record["answer"] == "late:6.00s"
    assert record["segments"][0] == {
        "start": 0.0,
        "end": 26.0,
        "answers": [""],
        "token_ids": [[]],
        "prompt_tokens": 0,
        "output_tokens": 0,
        "finish_reasons": ["silence"],
        "silent": True,
    }
    assert tool.cues(record) == [(26.0, 32.0, "late:6.00s")]


# --------------------------------------------------------------------------
# Long audio: where the cuts go
# --------------------------------------------------------------------------


def split(samples: np.ndarray, name: str) -> tuple[list[tuple[float, float]], list[bool]]:
    """The segments' times, and which are silent."""
    warnings: list[str] = []
    clip = tool.Clip(name, samples, RATE, 1)
    segments = tool.apply_long_audio_policy([clip], tool.Options(long_audio="split"), warnings)
    assert warnings == []
    return [(s.start_seconds, s.end_seconds) for s in segments], [s.silent for s in segments]


def test_a_30_01_s_clip_ending_in_silence_has_a_silent_tail():
    # Speech to 28 s, silence to 30.01 s. The cut may go no later than 29.01 s
    # (1 s before the end), so the 25-29.01 s window holds 28-29.01 s of the
    # pause, 50 whole 20 ms frames: its middle is 28.5 s. 28.5-30.01 s is
    # pure silence: not sent.
    segments, silent = split(speech_like(30.01, [(28.0, 30.01)]), "end-silent.wav")
    assert segments == [(0.0, 28.5), (28.5, 30.01)]
    assert silent == [False, True]


def test_a_30_3_s_clip_leaves_no_tail_under_1_s():
    segments, silent = split(speech_like(30.3, []), "talk.wav")
    assert len(segments) == 2 and silent == [False, False]
    assert segments[0][0] == 0.0 and segments[-1][1] == pytest.approx(30.3)
    assert all(1.0 <= end - start <= 30.0 for start, end in segments)


def test_an_all_silent_long_clip_is_split_and_nothing_is_sent():
    # 40 s of silence: the whole 25-30 s window is one pause, cut at 27.5 s.
    segments, silent = split(np.zeros(40 * RATE, np.float32), "silence.wav")
    assert segments == [(0.0, 27.5), (27.5, 40.0)]
    assert silent == [True, True]


@pytest.mark.parametrize(
    ("level_db", "silent"),
    [(-math.inf, True), (-70.0, True), (-55.0, True), (-45.0, False), (-12.0, False)],
)
def test_a_segment_is_silent_when_its_loudest_20_ms_stays_under_the_silence_level(level_db, silent):
    # White noise at a steady level (RMS, dBFS) for 40 s: one loud frame
    # anywhere makes a segment heard.
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(40 * RATE).astype(np.float32) * 10 ** (level_db / 20)
    assert split(noise, "noise.wav")[1] == [silent, silent]
    click = noise.copy()
    click[35 * RATE : 35 * RATE + 320] = 0.1  # one 20 ms frame at -20 dBFS
    assert split(click, "click.wav")[1] == [silent, False]


def word_gaps(start: float, end: float) -> list[tuple[float, float]]:
    """0.15 s gaps between "words" of 0.3-0.5 s from start until end."""
    gaps, t = [], start
    for i in range(1000):
        t += (0.3, 0.42, 0.5, 0.36)[i % 4]
        if t + 0.15 > end - 0.2:
            return gaps
        gaps.append((t, t + 0.15))
        t += 0.15
    raise AssertionError("unreachable")


def test_the_cut_goes_in_the_pause_between_sentences_not_the_latest_word_gap():
    # Sentences of words with 0.15 s gaps; a 0.8 s pause between sentences at
    # 26.0-26.8 s, inside the 25-30 s search window of a 30 s limit, and word
    # gaps after it up to the limit. The cut belongs in the sentence pause,
    # near its middle (26.4 s), though later word gaps are just as silent.
    sentence_gap = (26.0, 26.8)
    pauses = [*word_gaps(0.0, 26.0), sentence_gap, *word_gaps(26.8, 40.0)]
    later = [gap for gap in pauses if sentence_gap[1] < gap[0] and gap[1] < 30.0]
    assert len(later) >= 4  # the test's own premise: quiet word gaps after the long pause
    cut = tool.split_points(speech_like(40, pauses), 30.0)[0][1] / RATE
    assert sentence_gap[0] < cut < sentence_gap[1]
    assert cut == pytest.approx(26.4, abs=0.05)


@pytest.mark.parametrize("seconds", [1.5, 30.5])
def test_segment_seconds_outside_2_to_30_is_refused(seconds):
    with pytest.raises(
        tool.ExplainedError, match=rf"^--segment-seconds {seconds}: must be between 2"
    ):
        tool.Options(segment_seconds=seconds)


# --------------------------------------------------------------------------
# Sources: local paths, URLs, manifests
# --------------------------------------------------------------------------


def one_line_message(exc: BaseException) -> str:
    """The rule of every error: one line, control characters shown escaped."""
    message = str(exc)
    assert message.isprintable(), message
    return message


@pytest.mark.parametrize("name", ["take:2.wav", "2026-11-30T10:00.wav", "C:x.wav", "http:h.wav"])
def test_a_colon_in_a_file_name_is_a_local_path(tmp_path, name):
    assert tool.resolve_source(name, tmp_path, "W") == str(tmp_path / name)


def test_home_of_an_unknown_user_is_an_input_error_naming_it():
    with pytest.raises(tool.ExplainedError) as caught:
        tool.resolve_source("~nosuchuser12345/a.wav", BASE, "manifest line 3 (id a)")
    message = one_line_message(caught.value)
    assert message.startswith("manifest line 3 (id a): audio '~nosuchuser12345/a.wav': ")
    assert "~nosuchuser12345 is not a user here" in message


def test_a_bracket_after_a_double_slash_is_a_path_or_an_input_error():
    """A source "//[x" has no scheme (urlsplit would call "[x" a broken IPv6
    host): a local path, or refused as input, never another exception."""
    try:
        source = tool.resolve_source("//[x", BASE, "W")
    except tool.ExplainedError as exc:
        one_line_message(exc)
    else:
        assert source == "//[x"  # absolute, so not joined to the manifest's folder


@pytest.mark.parametrize(
    "url",
    [
        "http://[x",
        "http://host:99999/a.wav",
        "http://host:abc/a.wav",
        "http://host/a b.wav",
        "http:///a.wav",
        "HTTPS://host:-1/a.wav",
        "http://host/a\x00.wav",
    ],
)
def test_a_url_http_client_would_refuse_is_refused_up_front(url):
    with pytest.raises(tool.ExplainedError) as caught:
        tool.resolve_source(url, BASE, "W")
    assert "not a valid URL" in one_line_message(caught.value)


@pytest.mark.parametrize(
    ("source", "scheme"),
    [("s3://b/a.wav", "s3"), ("file:///etc/x.wav", "file"), ("FTP://h/a", "ftp")],
)
def test_other_schemes_are_refused_by_name(source, scheme):
    with pytest.raises(tool.ExplainedError, match=rf"scheme {scheme}:// is not supported"):
        tool.resolve_source(source, BASE, "W")


@pytest.mark.parametrize("source", ["~foo\nbar/a.wav", "~\x00/a.wav", "~\ud800/a.wav"])
def test_home_of_an_odd_user_name_is_a_one_line_input_error(source):
    with pytest.raises(tool.ExplainedError) as caught:
        tool.resolve_source(source, BASE, "W")
    one_line_message(caught.value)


def test_a_url_whose_host_urlsplit_rejects_is_a_one_line_error():
    with pytest.raises(tool.ExplainedError) as caught:
        tool.resolve_source("http://a\u2028\uff0f/x.wav", BASE, "W")
    assert "not a valid URL" in one_line_message(caught.value)


def test_a_bad_lines_fallback_id_never_collides_with_a_real_id(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "jobs.jsonl:2", "audio": "a.wav"}) + "\n{not json\n")
    requests = tool.read_manifest(path)
    assert len(requests) == 2
    assert len({r.id for r in requests}) == 2


# --------------------------------------------------------------------------
# Downloads a server cuts short or trickles
# --------------------------------------------------------------------------

WAV = io.BytesIO()
soundfile.write(WAV, tone(1, RATE), RATE, format="WAV")
WAV = WAV.getvalue()
TRICKLE_BYTES = 1000  # one byte per 0.1 s: 100 s for the whole body


class Misbehaving(http.server.BaseHTTPRequestHandler):
    trickle = {"sent": 0, "finished": False}  # what /trickle.wav's handler got out

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        if self.path == "/short.wav":  # promises the whole clip, sends 1000 bytes, hangs up
            self.send_header("Content-Length", str(len(WAV)))
            self.end_headers()
            self.wfile.write(WAV[:1000])
            self.close_connection = True
            return
        self.send_header("Content-Length", str(TRICKLE_BYTES))
        self.end_headers()
        try:
            for byte in WAV[:TRICKLE_BYTES]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                self.trickle["sent"] += 1
                time.sleep(0.1)
        except OSError:  # the client gave up, as it should
            return
        self.trickle["finished"] = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with local_http_server(Misbehaving) as url:
        yield url


def test_a_body_shorter_than_its_content_length_is_a_failed_download(server):
    """The connection closes after 1000 of the promised bytes: a clip cut
    short must not pass for the whole clip."""
    with pytest.raises(tool.ExplainedError) as caught:
        tool.fetch_url(f"{server}/short.wav", timeout=60.0, max_bytes=2**20)
    message = one_line_message(caught.value)
    assert message.startswith(f"audio {server}/short.wav: download failed (")
    assert f"{len(WAV) - 1000} more expected" in message


def test_a_trickling_download_stops_at_the_url_timeout(server):
    """Each byte comes in well under the socket timeout, so only the overall
    deadline can stop it; the server had not finished when it did."""
    with pytest.raises(tool.ExplainedError) as caught:
        tool.fetch_url(f"{server}/trickle.wav", timeout=1.0, max_bytes=2**20)
    assert not Misbehaving.trickle["finished"]
    assert Misbehaving.trickle["sent"] < TRICKLE_BYTES
    assert str(caught.value) == (
        f"audio {server}/trickle.wav: download failed (no complete answer within --url-timeout 1 s)"
    )


# --------------------------------------------------------------------------
# Scoring scripts with combining marks
# --------------------------------------------------------------------------


def test_hindi_words_keep_their_vowel_signs_and_viramas():
    # "नमस्ते दुनिया।" is 2 words (the danda । is punctuation); vowel signs and
    # the virama inside them are part of the words, not word breaks.
    reference = "नमस्ते दुनिया।"
    same = tool.score_answer("नमस्ते दुनिया", reference, "hi")
    assert (same["metric"], same["edits"], same["reference_units"]) == ("wer", 0, 2)
    half = tool.score_answer("नमस्ते", reference, "hi")
    assert (half["deletions"], half["edits"], half["reference_units"]) == (1, 1, 2)
    assert half["edits"] / half["reference_units"] == 0.5


def test_thai_characters_count_vowel_and_tone_marks():
    # สวัสดีครับ, code point by code point: ส ว ั ส ด ี ค ร ั บ = 10 (the vowel
    # signs ั and ี are characters of their own). สวัสดีคับ lacks the ร: one deletion.
    score = tool.score_answer("สวัสดีคับ", "สวัสดีครับ", "th")
    assert score["metric"] == "cer"
    assert (score["edits"], score["deletions"], score["reference_units"]) == (1, 1, 10)


# --------------------------------------------------------------------------
# Output on a full disk
# --------------------------------------------------------------------------

# stdout and stderr share one file (`>> job.log 2>&1`, a Slurm --output):
# the tool opens stdout, logs a line, then a result does not fit.
CHILD = """
import os, sys
from pathlib import Path
import run_qwen2_audio as tool
out = tool.OutputFile(None if sys.argv[1] == "-" else Path(sys.argv[1]))
print("note: a log line on stderr", file=sys.stderr, flush=True)
try:
    out.write("x" * 200_000 + "\\n")
except tool.OutputError as exc:
    try:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    except OSError:
        pass  # the disk is full for stderr too
    os._exit(3)
os._exit(0)
"""


@pytest.mark.parametrize("output", ["-", "/dev/stdout"])
def test_a_failed_write_to_stdout_never_cuts_the_shared_log(tiny_filesystem, output):
    """stdout itself, or --output /dev/stdout: the same shared log file."""
    log = tiny_filesystem / "job.log"
    header = "slurm: job 42 started\n"
    log.write_text(header)
    (tiny_filesystem / "filler").write_bytes(b"\0" * (48 * 1024))
    with log.open("ab") as shared:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, output],
            stdout=shared,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=120,
        )
    content = log.read_text()
    assert child.returncode == 3, content[-2000:]  # the write failed: OutputError
    before = header + "note: a log line on stderr\n"
    assert content.startswith(before)  # the earlier lines are whole
    assert content[len(before) :].startswith("x")  # and what stdout got is left as it is


def test_a_failed_write_to_a_results_file_is_cut_back_to_the_last_whole_record(tiny_filesystem):
    path = tiny_filesystem / "results.jsonl"
    out = tool.OutputFile(path)
    first = json.dumps({"id": "a", "answer": "kept"}) + "\n"
    out.write(first)
    with pytest.raises(tool.OutputError):
        out.write(json.dumps({"id": "b", "answer": "y" * 200_000}) + "\n")
    out.close(complete=False)
    assert path.read_text() == first


# --------------------------------------------------------------------------
# The answer guard in the feeder
# --------------------------------------------------------------------------


def clip_request(name: str, seconds: float) -> tool.PreparedRequest:
    """A request of one clip, already decoded, whose fake answer is
    "NAME:SECONDSs"."""
    request = tool.AudioRequest(name, [f"{name}.wav"], f"Which clip is {name}?")
    prompt = tool.QWEN2_AUDIO.prompt(request.question, 1)
    segment = tool.Segment([tone(seconds, RATE)], 0.0, seconds)
    return tool.PreparedRequest(request, prompt, [segment], seconds, [seconds])


def guarded(fallback: tuple[float, ...] | None = None) -> tool.Options:
    """Options whose guard finds every answer repeating (a threshold under any
    compression ratio): each is asked at every fallback temperature."""
    guard = tool.Guard(compression_ratio_threshold=-1.0, logprob_threshold=None, fallback=fallback)
    return tool.Options(profile=tool.QWEN2_AUDIO, guard=guard)


def test_the_feeder_asks_for_the_sampled_tokens_logprob_only_when_the_guard_reads_it():
    """logprobs=0 in vLLM's flat form (the guard reads cumulative_logprob
    alone); the caller's params are left as they were."""
    params = SamplingParams(temperature=0.2, max_tokens=8)
    fed = tool.for_the_feeder(params, tool.Guard())
    assert (fed.logprobs, fed.flat_logprobs) == (0, True)
    assert (params.logprobs, params.flat_logprobs) == (None, False)
    unmeasured = tool.for_the_feeder(params, tool.Guard(logprob_threshold=None))
    assert (unmeasured.logprobs, unmeasured.flat_logprobs) == (None, False)
    mine = tool.for_the_feeder(SamplingParams(logprobs=3), tool.Guard())
    assert (mine.logprobs, mine.flat_logprobs) == (3, False)  # the caller's own, as asked


def test_a_suspect_answer_is_asked_again_at_each_fallback_temperature_in_turn():
    prepared = [clip_request("trips", 2.0), clip_request("also", 1.0)]
    engine = FakeEngine()
    params = SamplingParams(temperature=0.2, top_p=0.9, max_tokens=8, seed=7)
    records = list(tool.answer_requests(FakeLLM(engine), prepared, params, guarded()))
    sent = [(fake_answer(prompt), p.temperature, p.top_p, p.seed) for prompt, p in engine.sent]
    for name, seconds in (("trips", "2.00"), ("also", "1.00")):
        mine = [rest for answer, *rest in sent if answer == f"{name}:{seconds}s"]
        assert mine == [[t, 0.9, 7] for t in (0.2, 0.4, 0.6, 0.8, 1.0)]
    for record in records:
        assert record["fallbacks"] == 4 and record["suspect"] == ["repetition"]
        assert record["temperature"] == 0.2  # all as bad: the first attempt is kept
    assert [r["id"] for r in records] == ["trips", "also"]


def test_a_greedy_request_asked_again_keeps_the_clis_other_sampling_flags():
    argv = ["--temperature", "0", "--top-p", "0.9", "--top-k", "5"]
    args = tool.with_profile_defaults(tool.build_parser().parse_args(argv), tool.QWEN2_AUDIO)
    first = tool.build_sampling_params(args)
    assert (first.top_p, first.top_k) == (1.0, 0)  # vLLM's greedy reset
    fallback = functools.partial(tool.build_sampling_params, args)
    engine = FakeEngine()
    list(
        tool.answer_requests(
            FakeLLM(engine), [clip_request("greedy", 1.0)], first, guarded(), fallback
        )
    )
    assert [(p.temperature, p.top_p, p.top_k) for _, p in engine.sent] == [
        (0.0, 1.0, 0),
        *((t, 0.9, 5) for t in (0.2, 0.4, 0.6, 0.8, 1.0)),
    ]


def test_a_refused_retry_keeps_the_earlier_answer_and_says_so():
    calls = {"n": 0}

    def refuse_the_second(prompt):
        calls["n"] += 1
        return ValueError("no room") if calls["n"] == 2 else None

    engine = FakeEngine(refuse=refuse_the_second)
    params = SamplingParams(temperature=0.2, max_tokens=8)
    [record] = tool.answer_requests(FakeLLM(engine), [clip_request("once", 1.0)], params, guarded())
    assert "error" not in record
    assert record["answer"] == "once:1.00s" and record["fallbacks"] == 0
    assert record["suspect"] == ["repetition"]
    assert any(
        "the engine refused it (no room); asked again after a suspect answer" in w
        for w in record["warnings"]
    ), record["warnings"]


def test_with_fallback_none_a_suspect_answer_is_flagged_not_asked_again():
    engine = FakeEngine()
    params = SamplingParams(temperature=0.2, max_tokens=8)
    [record] = tool.answer_requests(
        FakeLLM(engine), [clip_request("flag", 1.0)], params, guarded(fallback=())
    )
    assert len(engine.ids) == 1
    assert record["fallbacks"] == 0 and record["suspect"] == ["repetition"]


def test_a_recording_whose_every_heard_segment_failed_is_an_error_not_an_answer(tmp_path):
    # 27 s of silence, then 5 s the engine refuses: nothing sent was answered.
    samples = np.concatenate([np.zeros(27 * RATE, np.float32), speech_like(5, [])])
    soundfile.write(tmp_path / "late.wav", samples, RATE)
    request = tool.AudioRequest("late", [str(tmp_path / "late.wav")], "Which clip is late?")
    options = tool.Options(profile=tool.QWEN2_AUDIO)
    prepared = tool.prepare_request(request, options, None)
    engine = FakeEngine(refuse=lambda prompt: ValueError("too long"))
    [record] = answer(engine, [prepared])
    assert record["error"]["type"] == "engine_rejected", record


def test_an_all_silent_recording_has_n_empty_answers():
    silent = tool.Clip("silence.wav", np.zeros(40 * RATE, np.float32), RATE, 1)
    request = tool.AudioRequest("quiet", ["silence.wav"], "Which clip is quiet?")
    options = tool.Options(profile=tool.QWEN2_AUDIO)
    prepared = tool.PreparedRequest(request, prompt="Which clip is quiet?")
    prepared.segments = tool.apply_long_audio_policy([silent], options, prepared.warnings)
    prepared.split, prepared.clip_seconds, prepared.audio_seconds = True, [40.0], 40.0
    engine = FakeEngine()
    params = SamplingParams(temperature=0.7, n=3, max_tokens=8)
    [record] = tool.answer_requests(FakeLLM(engine), [prepared], params, options)
    assert engine.ids == []
    assert record["answers"] == ["", "", ""] and record["finish_reason"] == "silence"
    assert [s["silent"] for s in record["segments"]] == [True, True]
