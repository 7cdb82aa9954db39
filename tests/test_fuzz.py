"""Property tests (hypothesis): the manifest parser, the prompt builder and the
long-audio splitter hold their promises for any input, not just the ones we
thought of. Each property is stated here once; the examples beside them in
the other files pin particular cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import speech_like
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import run_qwen2_audio as tool

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = Path("/data")

# --------------------------------------------------------------------------
# Manifests: any line, any file
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)
manifest_objects = st.dictionaries(
    st.sampled_from(["id", "audio", "question", "system_prompt", "speaker", ""]),
    json_values | st.text(min_size=1) | st.lists(st.text(min_size=1), max_size=3),
)

# Audio sources as users write them, and as they mistype them: URLs with odd
# hosts, ports and schemes, ~user paths, relative and Windows-like paths.
ODD_TEXT = st.text(
    st.sampled_from(list(" %:~[]#?@\\\n\t\r\x00\x0b\x85\u2028\ufeffé日\ud800")) | st.characters(),
    max_size=12,
)
HOSTS = st.sampled_from(
    ["host", "127.0.0.1", "[::1]", "[x", "x]", "", "h st", "ü.example", "u:p@h", "%68", "h:", "@"]
) | st.text(max_size=8)
PORTS = (
    st.sampled_from(["", ":", ":80", ":0", ":65535", ":65536", ":abc", ": 80", ":٣"])
    | st.integers(-5, 200_000).map(lambda n: f":{n}")
    | st.text(max_size=4).map(lambda t: f":{t}")
)
SCHEMES = st.sampled_from(["http", "https", "HTTP", "Https", "file", "s3", "ftp", "c", "C", ""])
urls = st.builds(
    lambda scheme, sep, host, port, path: f"{scheme}{sep}{host}{port}/{path}",
    SCHEMES,
    st.sampled_from(["://", "://", ":/", ":", "//"]),
    HOSTS,
    PORTS,
    ODD_TEXT,
)
home_paths = st.sampled_from(["~", "~/", "~/a.wav", "~root/a.wav", "~nosuchuser12345/a.wav"]) | (
    st.builds(lambda user, path: f"~{user}/{path}", st.text(max_size=8), ODD_TEXT)
)
local_paths = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(["", "/", "./", "../", "C:", "c:\\", "take:", "2026-11-30T10:00", "//[x"]),
    ODD_TEXT,
).filter(lambda path: path and not path.startswith("~"))
sources = st.one_of(urls, urls, home_paths, local_paths)  # URLs twice as often
request_ids = st.sampled_from(["a", "b", " c ", "0"]) | st.text(min_size=1, max_size=8)
source_lines = st.builds(
    lambda request_id, audio: json.dumps({"id": request_id, "audio": audio}),
    request_ids,
    sources | st.lists(sources, min_size=1, max_size=3),
)
# Any text, any JSON object over the real and wrong keys, a line of odd sources.
manifest_lines = st.text() | manifest_objects.map(json.dumps) | source_lines


def usable_id(line: str) -> str | None:
    """The id a manifest line gives its request, as the manifest format
    defines it: a JSON object's "id", a non-blank string or an integer."""
    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        return None
    value = item.get("id") if isinstance(item, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value.strip() else None


def one_line(message: str) -> str:
    assert message.isprintable(), message  # one line, control characters escaped
    return message


@FUZZ
@example('{"id": "0\\n"}')  # an id with a newline: its error is still one line
@example(json.dumps({"id": "a", "audio": "http://[x"}))
@example(json.dumps({"id": "a", "audio": ["take:2.wav", "http://host:abc/a.wav"]}))
@example(json.dumps({"id": "a", "audio": "~nosuchuser12345/a.wav"}))
@given(manifest_lines)
def test_any_manifest_line_is_a_request_or_one_input_error(line):
    """A line with a usable id is a request under that id (carrying its one
    line error if the rest is wrong); only a line without one raises, naming
    the line. A request's audio is an http(s) URL or an absolute path."""
    given_id = usable_id(line)
    try:
        request = tool.parse_manifest_line(line, 7, BASE)
    except tool.ExplainedError as exc:
        assert given_id is None, f"a line with id {given_id!r} raised"
        assert one_line(str(exc)).startswith("manifest line 7: ")
        return
    assert given_id is not None and request.id == tool.escape_undecodable(given_id)
    request.id.encode("utf-8")  # it goes into the output as is
    if request.error is not None:  # a bad line with a usable id keeps it
        assert request.error.kind == "input_error"  # the user's input, never our defect
        shown = tool.escape_controls(request.id)
        assert one_line(str(request.error)).startswith(f"manifest line 7 (id {shown}): ")
        return
    assert request.audio and all(isinstance(a, str) for a in request.audio)
    for source in request.audio:
        url = source.lower().startswith(("http://", "https://"))
        assert url or Path(source).is_absolute(), source
    assert request.question is None or isinstance(request.question, str)


@FUZZ
@given(
    lines=st.lists(
        st.binary(max_size=80) | manifest_lines.map(lambda line: line.encode("utf-8", "replace"))
    ),
    deep_at=st.integers(0, 8),
)
def test_any_manifest_file_gives_one_request_per_line_and_unique_ids(
    tmp_path_factory, lines, deep_at
):
    """Any lines, bytes that are not UTF-8 and one JSON line nested past any
    parser's depth among them: one request per non-blank line, ids unique
    and sorted, the deep line an error under its line number."""
    deep_at = min(deep_at, len(lines))
    lines.insert(deep_at, b"[" * 100_000)
    path = tmp_path_factory.mktemp("m") / "jobs.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    requests = tool.read_manifest(path)
    non_blank = [x for x in path.read_bytes().split(b"\n") if x.decode("utf-8", "replace").strip()]
    assert len(requests) == len(non_blank)
    assert len({r.id for r in requests}) == len(requests)
    assert [r.id for r in requests] == sorted(r.id for r in requests)
    (deep,) = [r for r in requests if r.error and "nested too deeply" in str(r.error)]
    assert deep.id == f"jobs.jsonl:{deep_at + 1}"
    one_line(str(deep.error))


# --------------------------------------------------------------------------
# Prompts: any question
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@FUZZ
@given(
    question=st.text()
    | st.sampled_from(tool.QWEN2_AUDIO.special_tokens).map(lambda t: f"say {t} now"),
    clips=st.integers(1, 3),
)
def test_any_question_gives_a_well_formed_prompt_or_is_refused(tokenizer, question, clips):
    """Decision: chat control tokens in user text are refused (one-line
    error) unless --allow-special-tokens; everything else is passed verbatim,
    and the prompt then has exactly the control tokens the template puts in."""
    try:
        tool.check_no_special_tokens(question, "question", tool.QWEN2_AUDIO)
    except tool.ExplainedError as exc:
        assert any(token in question for token in tool.QWEN2_AUDIO.special_tokens)
        assert "--allow-special-tokens" in str(exc)
        return
    prompt = tool.QWEN2_AUDIO.prompt(question, clips)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    count = {
        t: ids.count(tokenizer.convert_tokens_to_ids(t)) for t in tool.QWEN2_AUDIO.special_tokens
    }
    assert count["<|AUDIO|>"] == count["<|audio_bos|>"] == count["<|audio_eos|>"] == clips
    assert count["<|im_start|>"] == 3 and count["<|im_end|>"] == 2
    assert count["<|endoftext|>"] == 0
    assert question in prompt


# --------------------------------------------------------------------------
# Long audio: any clip, any segment limit
# --------------------------------------------------------------------------


def clip_samples(kind: str, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * tool.SAMPLE_RATE)
    if kind == "speech-like":
        starts = np.sort(rng.uniform(0, seconds, size=int(seconds / 4) + 1))
        return speech_like(seconds, [(s, s + rng.uniform(0.1, 1.2)) for s in starts])
    return {
        "noise": lambda: rng.standard_normal(n),
        "silence": lambda: np.zeros(n),
        "bursts": lambda: (
            np.repeat(rng.random(n // 800 + 1) > 0.5, 800)[:n] * rng.standard_normal(n)
        ),
    }[kind]().astype(np.float32)


@FUZZ
@example(seconds=30.01, limit=30.0, kind="speech-like", seed=0)
@example(seconds=2.01, limit=2.0, kind="silence", seed=0)
@example(seconds=60.0, limit=30.0, kind="silence", seed=0)
@given(
    seconds=st.floats(tool.MIN_CLIP_SECONDS, 70.0),  # shorter clips are refused before
    limit=st.floats(2.0, 30.0),
    kind=st.sampled_from(["noise", "silence", "bursts", "speech-like"]),
    seed=st.integers(0, 2**16),
)
def test_any_clip_splits_into_segments_that_cover_it_exactly(seconds, limit, kind, seed):
    """Contiguous segments from the first sample to the last, none longer
    than the limit, each with an audio token; when cut, none under 1 s."""
    samples = clip_samples(kind, seconds, seed)
    rate = tool.SAMPLE_RATE
    ranges = tool.split_points(samples, limit)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    assert all(start < end <= start + int(limit * rate) for start, end in ranges)
    if len(ranges) > 1:  # a clip that was cut: no sliver anywhere
        assert all(end - start >= tool.MIN_SEGMENT_SECONDS * rate for start, end in ranges)
    assert all(tool.qwen2_audio_tokens(end - start) >= 1 for start, end in ranges)
