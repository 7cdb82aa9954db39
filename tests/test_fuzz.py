"""Property tests (hypothesis): the manifest parser, the prompt builder and the
long-audio splitter hold their promises for any input, not just the ones we
thought of."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import run_qwen2_audio as tool

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = Path("/data")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)
manifest_objects = st.dictionaries(
    st.sampled_from(["id", "audio", "question", "system_prompt", "speaker", ""]),
    json_values | st.text(min_size=1) | st.lists(st.text(min_size=1), max_size=3),
)


@FUZZ
@example('{"id": "0\\n"}')  # an id with a newline: its error is still one line
@given(st.text() | manifest_objects.map(json.dumps))
def test_any_manifest_line_is_a_request_or_one_input_error(line):
    try:
        request = tool.parse_manifest_line(line, 7, BASE)
    except tool.InputError as exc:
        assert str(exc).startswith("manifest line 7") and "\n" not in str(exc)
        return
    assert isinstance(request.id, str) and request.id.strip()
    request.id.encode("utf-8")  # printable: it goes into the output as is
    if request.error is not None:  # a bad line with a usable id keeps it
        message = str(request.error)
        shown = tool.one_line(request.id)
        assert message.startswith(f"manifest line 7 (id {shown})") and "\n" not in message
        return
    assert request.audio and all(isinstance(a, str) for a in request.audio)
    for source in request.audio:  # an http(s) URL or an absolute local path
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        assert scheme in ("http", "https") or Path(source).is_absolute(), source
    assert request.question is None or isinstance(request.question, str)


@FUZZ
@given(st.lists(st.binary(max_size=80) | manifest_objects.map(lambda o: json.dumps(o).encode())))
def test_any_manifest_file_gives_one_request_per_line_and_unique_ids(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("m") / "jobs.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    requests = tool.read_manifest(path)
    non_blank = [x for x in path.read_bytes().split(b"\n") if x.decode("utf-8", "replace").strip()]
    assert len(requests) == len(non_blank)
    assert len({r.id for r in requests}) == len(requests)
    assert [r.id for r in requests] == sorted(r.id for r in requests)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@FUZZ
@given(
    question=st.text() | st.sampled_from(tool.SPECIAL_TOKENS).map(lambda t: f"say {t} now"),
    clips=st.integers(1, 3),
)
def test_any_question_gives_a_well_formed_prompt_or_is_refused(tokenizer, question, clips):
    """Decision: chat control tokens in user text are refused (one-line
    error) unless --allow-special-tokens; everything else is passed verbatim,
    and the prompt then has exactly the control tokens the template puts in."""
    try:
        tool.check_no_special_tokens(question, "question")
    except tool.InputError as exc:
        assert any(token in question for token in tool.SPECIAL_TOKENS)
        assert "--allow-special-tokens" in str(exc)
        return
    prompt = tool.build_prompt(question, clips, tool.DEFAULT_SYSTEM_PROMPT)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    count = {t: ids.count(tokenizer.convert_tokens_to_ids(t)) for t in tool.SPECIAL_TOKENS}
    assert count["<|AUDIO|>"] == count["<|audio_bos|>"] == count["<|audio_eos|>"] == clips
    assert count["<|im_start|>"] == 3 and count["<|im_end|>"] == 2
    assert count["<|endoftext|>"] == 0
    assert question in prompt


@FUZZ
@given(
    seconds=st.floats(0.0, 70.0),
    limit=st.floats(2.0, 30.0),
    kind=st.sampled_from(["noise", "silence", "bursts"]),
    seed=st.integers(0, 2**16),
)
def test_any_clip_splits_into_segments_that_cover_it_exactly(seconds, limit, kind, seed):
    rng = np.random.default_rng(seed)
    n = int(seconds * tool.SAMPLE_RATE)
    samples = {
        "noise": rng.standard_normal(n),
        "silence": np.zeros(n),
        "bursts": np.repeat(rng.random(n // 800 + 1) > 0.5, 800)[:n] * rng.standard_normal(n),
    }[kind].astype(np.float32)
    ranges = tool.split_points(samples, limit)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    assert all(end - start <= int(limit * tool.SAMPLE_RATE) for start, end in ranges)
    assert all(end > start for start, end in ranges) or n == 0
    if len(ranges) > 1:  # a split clip: no sliver, every segment heard
        shortest = int(tool.MIN_SEGMENT_SECONDS * tool.SAMPLE_RATE)
        assert all(end - start >= shortest for start, end in ranges)
        assert all(tool.audio_token_count(end - start) >= 1 for start, end in ranges)
