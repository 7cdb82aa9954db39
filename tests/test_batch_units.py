"""Batch inputs, sharding, resume bookkeeping, long-audio splitting and the
memory estimate, without the engine."""

from __future__ import annotations

import json
import math

import pytest
from helpers import PAUSES, PUBLISHED, speech_like

import run_qwen2_audio as tool


def write_manifest(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_good_and_bad_lines(tmp_path):
    manifest = write_manifest(
        tmp_path / "jobs.jsonl",
        [
            json.dumps({"id": "b", "audio": "clips/b.wav", "question": "Q?"}),
            json.dumps({"id": "a", "audio": ["/x/1.wav", "https://h/2.mp3"]}),
            "{not json",
            json.dumps({"id": "c", "audio": "c.wav", "speaker": "x"}),
            json.dumps({"id": "d", "audio": 5}),
            json.dumps({"id": "e"}),
            json.dumps({"id": "a", "audio": "dup.wav"}),
            json.dumps({"id": "f", "audio": "file:///etc/passwd"}),
            "",
        ],
    )
    requests = {r.id: r for r in tool.read_manifest(manifest)}
    assert requests["b"].audio == [str(tmp_path / "clips/b.wav")]
    assert requests["b"].question == "Q?"
    assert requests["a"].audio == ["/x/1.wav", "https://h/2.mp3"]
    errors = {k: str(r.error) for k, r in requests.items() if r.error}
    # A bad line keeps its own id, so results join back to the manifest by id;
    # only a line without a usable id (or with a taken one) is named file:line.
    assert "line 3: not valid JSON" in errors["jobs.jsonl:3"]
    assert "line 4 (id c): unknown key(s) speaker" in errors["c"]
    assert 'line 5 (id d): "audio" must be' in errors["d"]
    assert 'line 6 (id e): "audio" must be' in errors["e"]
    assert "line 7: duplicate id 'a'" in errors["jobs.jsonl:7"]
    assert (
        "line 8 (id f): audio 'file:///etc/passwd': scheme file:// is not supported"
        in (errors["f"])
    )
    assert set(errors) == {"jobs.jsonl:3", "c", "d", "e", "jobs.jsonl:7", "f"}
    assert list(requests) == sorted(requests)


def test_audio_dir_is_scanned_sorted(tmp_path):
    for name in ["z.wav", "sub/a.flac", "sub/notes.txt", "m.mp3"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ids = [r.id for r in tool.scan_audio_dir(tmp_path)]
    assert ids == ["m.mp3", "sub/a.flac", "z.wav"]


def test_shards_are_disjoint_and_cover_everything():
    ids = [f"clip-{i:05d}" for i in range(1000)]
    shards = [{i for i in ids if tool.in_shard(i, k, 8)} for k in range(8)]
    assert set().union(*shards) == set(ids)
    assert sum(len(s) for s in shards) == len(ids)
    assert min(len(s) for s in shards) > 80  # roughly balanced
    with pytest.raises(tool.ExplainedError, match="--shard 8/8"):
        tool.parse_shard("8/8")


def test_resume_drops_a_torn_line_and_optionally_errors(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(
        json.dumps({"id": "a", "answer": "x"})
        + "\n"
        + json.dumps({"id": "b", "error": {"type": "t", "message": "m"}})
        + "\n"
        + '{"id": "c", "ans'
    )
    assert tool.read_finished_ids(out, retry_errors=False) == {"a", "b"}
    assert out.read_text().count("\n") == 2 and out.read_text().endswith("\n")
    assert tool.read_finished_ids(out, retry_errors=True) == {"a"}
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a"]


def test_report_arithmetic():
    report = tool.RunReport(requests=3, wall_seconds=10.0, generate_seconds=4.0)
    for seconds, prompt, output in [(30.0, 800, 60), (15.0, 400, 20)]:
        report.add({"audio_seconds": seconds, "prompt_tokens": prompt, "output_tokens": output})
    report.add({"id": "x", "error": {}})
    summary = report.summary()
    assert (report.ok, report.failed) == (2, 1)
    assert summary["real_time_factor"] == 4.5
    assert summary["prompt_tokens_per_second"] == 300.0
    assert summary["output_tokens_per_second"] == 20.0


def test_75s_recording_splits_into_3_segments_inside_pauses():
    samples = speech_like(75, PAUSES)
    ranges = tool.split_points(samples, 30.0)
    assert len(ranges) == 3
    assert ranges[0][0] == 0 and ranges[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for (_, cut), (start, end) in zip(ranges[:-1], PAUSES, strict=True):
        assert start * 16000 <= cut <= end * 16000
    assert all(b - a <= 30 * 16000 for a, b in ranges)


def test_split_truncate_and_error_policies():
    clip = tool.Clip("long.wav", speech_like(75, PAUSES), 16000, 1)
    options = tool.Options(system_prompt="", url_timeout=10, max_audio_bytes=2**30)
    segments = tool.apply_long_audio_policy([clip], options, [])
    assert len(segments) == 3 and segments[0].start_seconds == 0.0
    for segment, after, (start, end) in zip(segments, segments[1:], PAUSES, strict=False):
        assert segment.end_seconds == after.start_seconds
        assert start <= after.start_seconds <= end
    assert segments[-1].end_seconds == 75.0
    warnings = []
    options.long_audio = "truncate"
    [segment] = tool.apply_long_audio_policy([clip], options, warnings)
    assert len(segment.clips[0]) == 30 * 16000
    assert warnings == ["audio long.wav: 75.0 s truncated to 30 s, 45.0 s dropped"]
    options.long_audio = "error"
    with pytest.raises(tool.ExplainedError, match=r"long.wav \(75.0 s\): longer than 30 s"):
        tool.apply_long_audio_policy([clip], options, [])


def test_memory_estimate_for_qwen2_audio_7b_is_what_transformers_builds():
    """The tool's parameter count and KV bytes per token for the 7B, from the
    config.json as published (its text_config leaves the Qwen2 geometry to
    transformers' defaults), against transformers' model built from it on the
    meta device: its attention layers' K and V widths, and "8.4B" as the
    model card says."""
    import torch
    from transformers import AutoConfig, Qwen2AudioForConditionalGeneration

    published = PUBLISHED / "Qwen2-Audio-7B-Instruct"
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(AutoConfig.from_pretrained(published))
    attention = [m for m in model.modules() if type(m).__name__ == "Qwen2Attention"]
    kv_width = sum(a.k_proj.out_features + a.v_proj.out_features for a in attention)
    assert len(attention) == 32

    for facts in (tool.read_model_facts(published), tool.read_model_facts(None)):
        assert facts.parameters == SEVEN_B_PARAMETERS
        assert facts.dtype == "bfloat16"
        assert facts.kv_values_per_token == kv_width
        [line] = tool.memory_estimate_lines(facts, {"dtype": "auto"}, None, None)[:1]
        assert "weights 8,397,094,912 params (8.40 B) x 2 B = 15.64 GiB" in line
        assert line.endswith("KV cache 512 KiB/token")


def test_the_config_a_dry_run_plans_with_before_a_download_is_the_published_one():
    published = json.loads((PUBLISHED / "Qwen2-Audio-7B-Instruct/config.json").read_text())
    published.pop("transformers_version", None)
    assert tool.QWEN2_AUDIO.published_config == published


def test_parameter_count_of_a_checkpoint_is_what_it_stores(tiny_model):
    """A checkpoint's own config.json (the tiny one: 1 KV head for 2 heads)
    gives the number of parameters its safetensors files hold."""
    from safetensors import safe_open

    stored = 0
    for path in tiny_model.glob("*.safetensors"):
        with safe_open(path, "np") as weights:
            for name in weights.keys():
                stored += math.prod(weights.get_slice(name).get_shape())
    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    assert text["num_key_value_heads"] < text["num_attention_heads"]
    facts = tool.read_model_facts(tiny_model)
    assert facts.parameters == stored
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert facts.kv_values_per_token == (
        text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2
    )


SEVEN_B_PARAMETERS = 8_397_094_912  # "8.4B params" on the model card
SEVEN_B = tool.read_model_facts(PUBLISHED / "Qwen2-Audio-7B-Instruct")
GIB = 2**30


@pytest.mark.parametrize(
    "device_gib, kv_tokens, at_once",
    [
        # (32 GiB x 0.8 - 2 x 8,397,094,912 B) / 512 KiB = 20,396 tokens;
        # one 4096-token sequence fits (vLLM starts) although 5 x 4096 would
        # not: the old, stricter rule called this "WILL NOT FIT".
        (32, 20_396, 24),
        # (64 GiB x 0.8 - weights) / 512 KiB = 72,825 tokens.
        (64, 72_825, 86),
    ],
)
def test_fit_follows_vllms_rule_by_hand(device_gib, kv_tokens, at_once):
    usable = device_gib * GIB * 0.8  # this tool's default utilization
    assert kv_tokens == int((usable - 2 * SEVEN_B_PARAMETERS) // 524288)
    largest_request = 780 + 64  # a 30 s clip's prompt + the tutorial's max_tokens
    assert at_once == kv_tokens // largest_request
    lines = tool.memory_estimate_lines(
        SEVEN_B, tool.engine_kwargs(), device_gib * GIB, largest_request
    )
    assert f"x gpu_memory_utilization 0.8 = {usable / GIB:.2f} GiB usable" in lines[1]
    assert f"= {kv_tokens:,} tokens" in lines[1]
    assert lines[2] == (
        "start-up: one max_model_len 4096 sequence needs 2.00 GiB of KV cache: "
        "fits, vLLM will start"
    )
    assert f"largest request is 844 tokens (prompt + max_tokens): {at_once} such" in lines[3]
    assert f"--max-num-seqs 5 runs at most 5 (raise it up to {at_once}" in lines[3]


def test_concurrency_is_bounded_by_what_the_tool_keeps_in_the_engine():
    # Without --max-num-seqs vLLM allows 256; the CLI then keeps 64 requests in
    # flight, each --n sequences.
    kwargs = {**tool.engine_kwargs(), "max_num_seqs": None}

    def concurrency(device: int, request: int, in_flight: int | None, n: int = 1) -> str:
        lines = tool.memory_estimate_lines(SEVEN_B, kwargs, device, request, in_flight, n)
        return lines[-1]

    device, short_clips = 64 * GIB, 150  # a 3 s clip's prompt + a short answer
    at_once = int(concurrency(device, short_clips, None).split(": ")[2].split()[0])
    assert at_once > 256
    assert (
        f"--chunk-size 64 keeps at most 64 (raise --chunk-size up to 256, and "
        f"--max-num-seqs up to {at_once} with it, for batch throughput)"
    ) in concurrency(device, short_clips, 64)
    assert "--chunk-size 64 x --n 2 keeps at most 128 (raise --chunk-size up to 128," in (
        concurrency(device, short_clips, 64, n=2)
    )
    assert "--max-num-seqs 256 runs at most 256 (raise it up to" in (
        concurrency(device, short_clips, 512)
    )
    # 32 GiB holds 24 requests of a 30 s clip's prompt and 64 tokens.
    assert "--chunk-size 64 keeps up to 64, more than fit: the rest wait" in (
        concurrency(32 * GIB, 844, 64)
    )
    assert "--chunk-size 6 x --n 4 keeps at most 24: as many as fit" in (
        concurrency(32 * GIB, 844, 6, n=4)
    )


def test_fit_refuses_what_vllm_would_refuse(capsys):
    # 20 GiB x 0.8 = 16 GiB: 0.36 GiB left after the weights, 735 tokens < 4096.
    kwargs = tool.engine_kwargs()
    lines = tool.memory_estimate_lines(SEVEN_B, kwargs, 20 * GIB, 844)
    assert "= 735 tokens" in lines[1] and lines[2].endswith("WILL NOT START")
    assert "vLLM will refuse to start" in capsys.readouterr().err
    tp2 = tool.engine_kwargs(tensor_parallel_size=2)
    lines = tool.memory_estimate_lines(SEVEN_B, tp2, 20 * GIB, 844)
    # Per device: half the weights and half of each token's KV heads.
    assert f"= {int((16 * GIB - SEVEN_B_PARAMETERS) // 262144):,} tokens" in lines[1]
    assert lines[2].endswith("fits, vLLM will start")


def test_npu_memory_default_reaches_the_engine_unless_overridden():
    assert tool.engine_kwargs()["gpu_memory_utilization"] == 0.8
    assert tool.engine_kwargs(gpu_memory_utilization=0.5)["gpu_memory_utilization"] == 0.5
    # vLLM's own default is left out of the call, so vLLM applies it itself.
    defaults = tool.vllm_engine_defaults()
    chosen = tool.engine_kwargs(gpu_memory_utilization=defaults["gpu_memory_utilization"])
    assert "gpu_memory_utilization" not in chosen
