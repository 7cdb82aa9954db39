"""Each decision is made once, and what the user gave wins: the model in a
--config file, an explicit engine flag where vLLM's default is None, the
prompt format of a hub model in the local cache, the engine's own
max_model_len, values out of range, and one rule for failed requests in every
output mode. Each behaviour here was wrong before issue 27 (the CLI cases were
run on the old script: the config's model and --no-enable-prefix-caching were
dropped, --url-timeout -5 was accepted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    ROOT,
    base_model_copy,
    cache_in_hugging_face_hub,
    engine_arguments,
    one_error_line,
    run_cli,
    tone,
)

import run_qwen2_audio as tool


def test_a_model_and_engine_flags_in_a_config_file_count_and_the_command_line_wins(
    tiny_model, clips, home, vllm
):
    """vLLM's --config YAML: its model is the one checked and loaded (not the
    default hub id), its engine flags reach LLM(...), and a flag on the
    command line wins over the file; --no-enable-prefix-caching is kept
    although vLLM's default (None) is falsy too."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "run.yaml"
    config.write_text(f"model: {tiny_model}\nmax-num-seqs: 3\nmax_model_len: 2048\n")
    result = run_cli(
        "--config=~/run.yaml",  # read as `--config $HOME/run.yaml`, as vLLM reads only that
        "--dry-run",
        "--audio",
        clips["a.wav"],
        "--max-model-len",
        "1024",
        "--no-enable-prefix-caching",
        "--conf",  # --config-format shortened, not a second --config
        "hf",
        home=home,
        python=vllm,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    engine = engine_arguments(result.stdout)
    assert engine["model"] == str(tiny_model)
    assert engine["config_format"] == "hf"
    assert engine["max_num_seqs"] == 3
    assert engine["max_model_len"] == 1024
    assert engine["enable_prefix_caching"] is False
    # The local tokenizer counted the prompt: the model was found before loading.
    assert "prompt tokens" in result.stdout and "of max_model_len 1024" in result.stdout


def test_a_flag_equal_to_vllms_default_is_left_to_vllm():
    parser = tool.build_parser()
    args = parser.parse_args(["--enable-prefix-caching", "--seed", "0"])
    chosen = tool.engine_flags(args, parser)
    assert chosen["enable_prefix_caching"] is True
    assert "seed" not in chosen  # vLLM's default is 0: the same call either way
    assert "seed" not in tool.engine_kwargs(seed=0)


def test_values_out_of_range_are_refused_not_clamped(home, clips):
    result = run_cli("--dry-run", "--audio", clips["a.wav"], "--url-timeout", "-5", home=home)
    assert one_error_line(result) == "error: --url-timeout -5: must be a number above 0"
    for field, flag in [
        ("max_audio_bytes", "--max-audio-mb"),
        ("chunk_size", "--chunk-size"),
        ("decode_workers", "--decode-workers"),
        ("url_timeout", "--url-timeout"),
    ]:
        for value in (0, -1, math.nan, math.inf):
            with pytest.raises(tool.ExplainedError, match=f"^{flag} .*: must be a number above 0$"):
                tool.Options(**{field: value})
    parser = tool.build_parser()
    for value in ("nan", "inf", "0"):
        args = parser.parse_args(["--max-audio-mb", value])
        with pytest.raises(tool.ExplainedError, match=f"^--max-audio-mb {value}: must be a number"):
            tool.options_from_args(args)


def test_max_model_len_auto_is_the_models_own_limit(tiny_model, clips, home):
    """vLLM's --max-model-len auto (-1): no limit of our own; a dry run shows
    the model's max_position_embeddings, which vLLM then uses."""
    args = tool.build_parser().parse_args(["--max-model-len", "auto"])
    assert tool.options_from_args(args).max_model_len is None
    result = run_cli(
        "--model",
        tiny_model,
        "--dry-run",
        "--audio",
        clips["a.wav"],
        "--max-model-len",
        "auto",
        home=home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "of max_model_len 4096;" in result.stdout  # the tiny model's 4096 positions


def test_a_config_file_vllm_would_stop_on_is_one_line_before_vllm_is_loaded(home, tmp_path):
    """vLLM's parser ends these with a traceback (an assert, a ValueError, an
    AttributeError on an empty file, a TypeError on a key that is no name, an
    IndexError or a wrong value on a negative decimal), passes "None" on or
    finds a shortened --model ambiguous; here each is one line naming the
    file and the fix, said before vLLM is imported (which logs)."""
    (tmp_path / "run.json").write_text('{"max-num-seqs": 3}')
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- max-num-seqs\n- 3\n")
    (tmp_path / "run.yaml").write_text("max-num-seqs: 3\n")
    (tmp_path / "on.yaml").write_text("on: true\n")  # YAML 1.1: the key is True
    (tmp_path / "none.yaml").write_text("model:\n")
    (tmp_path / "mode.yaml").write_text("mode: /models/x\n")
    (tmp_path / "latin1.yaml").write_bytes("question: caf\u00e9\n".encode("latin-1"))
    (tmp_path / "negative.yaml").write_text("logprob-threshold: -0.5\nmax-num-seqs: 3\n")
    (tmp_path / "d.yaml").write_text("d: true\n")  # --dry-run or --debug, or more
    cases = [
        (["--config", "no-such.yaml"], "--config no-such.yaml: cannot read it ("),
        (["--config", "run.json"], "--config run.json: vLLM reads only YAML files; give a file"),
        (["--config", "empty.yaml"], "--config empty.yaml: holds no flags (a YAML mapping"),
        (["--config", "list.yaml"], "--config list.yaml: holds no flags (a YAML mapping"),
        (["--config", "on.yaml"], "--config on.yaml: True is not a flag name; write names"),
        (["--config", "none.yaml"], "--config none.yaml: model has no value; give it one"),
        (["--config", "run.yaml", "--config=run.yaml"], "--config is given 2 times (run.yaml, "),
        (["--dry-run", "--config"], "--config needs a YAML file of flags after it: --config "),
        (["--dry-run", "--config="], "--config needs a YAML file of flags after it: --config "),
        (["--dry-run", "--model"], "--model needs a hub id or a directory: --model Qwen/"),
        (["--dry-run", "--mod", "x"], "--mod: write --model in full (vLLM's flags --model-impl"),
        (["--config", "mode.yaml"], "--config mode.yaml: mode: write --model in full (vLLM's"),
        (["--config", "latin1.yaml"], "--config latin1.yaml: cannot read it ("),
        (["--config", "negative.yaml"], "--config negative.yaml: logprob-threshold: -0.5: vLLM"),
        (
            ["--config", "d.yaml"],
            "--config d.yaml: ambiguous option: --d could match --dry-run, --debug, or more of"
            " vLLM's; write the key in full",
        ),
    ]
    for argv, said in cases:
        result = run_cli(*argv, home=home, cwd=tmp_path)
        error = one_error_line(result)
        assert error.startswith(f"error: {said}"), (argv, error)
        assert result.stderr == error + "\n", "said before vLLM (which logs) is imported"


def test_config_with_an_equals_sign_is_read_as_vllm_reads_a_config_file():
    """vLLM's parser reads `--config FILE` only; `--config=FILE` would be
    taken for a shortening of --config-format."""
    home = os.path.expanduser("~")
    assert tool.split_config_value(["--config=~/run.yaml", "--seed=1"]) == [
        "--config",
        f"{home}/run.yaml",
        "--seed=1",
    ]
    assert tool.split_config_value(["--config", "run.yaml"]) == ["--config", "run.yaml"]


def test_a_model_directory_under_home_reaches_the_engine_expanded(tiny_model, monkeypatch):
    """vLLM does not expand "~" (a --config value is never shell-expanded):
    it would take the string for a hub id."""
    monkeypatch.setenv("HOME", str(tiny_model.parent))
    source = tool.locate_model(f"~/{tiny_model.name}")
    assert source.for_engine() == str(tiny_model)


def test_an_error_replaces_an_earlier_answer_of_the_same_id(tmp_path):
    """Without --resume a new run's records replace the old ones: a request
    answered before and failing now leaves its error, not the old answer."""
    writer = tool.DirectoryWriter(tmp_path / "out", "json")
    writer.write({"id": "a", "answers": ["old"]})
    writer.write({"id": "a", "error": {"type": "audio_decode_error", "message": "bad"}})
    writer.close(complete=True)
    assert not (tmp_path / "out/a.json").exists()
    assert (tmp_path / "out/errors/a.json").exists()


def test_a_hub_model_in_the_cache_resolves_to_its_own_prompt_format(
    tiny_model, tmp_path, monkeypatch
):
    """What answer_requests reads when the engine was given a hub id: the
    cached base model (no chat template) gets raw prompts, not chat ones."""
    base = base_model_copy(tiny_model, tmp_path)
    cache_in_hugging_face_hub(base, tmp_path / "home", "Qwen/Qwen2-Audio-7B")
    cache = tmp_path / "home/.cache/huggingface/hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "False")
    directory = tool.checkpoint_directory("Qwen/Qwen2-Audio-7B")
    assert directory is not None and directory.is_relative_to(cache)
    assert tool.choose_profile("auto", tool.read_model_facts(directory)) is tool.QWEN2_AUDIO_BASE


def test_the_budget_is_the_engines_unless_one_is_given(tiny_model, tmp_path):
    """A library caller's Options carry no limit of their own (the old
    default refused at a copied 4096): answer_requests fills in the engine's
    max_model_len, and a limit the caller gives is checked."""
    long_question = "word " * 5000
    soundfile.write(tmp_path / "a.wav", tone(1, 16000), 16000)
    request = tool.AudioRequest(id="q", audio=[str(tmp_path / "a.wav")], question=long_question)
    count = tool.load_tokenizer_counter(tiny_model, False)
    assert tool.prepare_request(request, tool.Options(), count).error is None
    limited = tool.prepare_request(request, tool.Options(max_model_len=4096), count)
    assert "--max-model-len is 4096" in str(limited.error)


@pytest.mark.engine
def test_a_failed_request_is_recorded_and_resumed_alike_in_every_output_mode(
    tiny_model, clips, home, tmp_path
):
    """--output-dir: the error record goes to errors/ID.json; --resume writes
    only the files that are missing and skips the error as it skips an error
    line of --output; --retry-errors asks again, and a success removes the
    error file."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not audio")
    manifest = tmp_path / "jobs.jsonl"
    lines = [("good", clips["a.wav"]), ("talks/other", clips["c.flac"]), ("bad", broken)]
    manifest.write_text("".join(json.dumps({"id": i, "audio": str(a)}) + "\n" for i, a in lines))
    out = tmp_path / "results"

    def run(*flags: str) -> subprocess.CompletedProcess:
        return run_cli(
            "--model",
            tiny_model,
            "--manifest",
            manifest,
            "--output-dir",
            out,
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            *flags,
            *CPU_ENGINE_FLAGS,
            *ASK_ONCE,
            home=home,
            env=IN_PROCESS_ENGINE,
        )

    first = run()
    assert first.returncode == 1, first.stderr[-3000:]
    error = json.loads((out / "errors/bad.json").read_text())
    assert error["id"] == "bad" and error["error"]["type"] == "audio_decode_error"
    assert sorted(p.name for p in out.iterdir()) == ["errors", "good.json", "talks%2Fother.json"]

    kept, lost = out / "talks%2Fother.json", out / "good.json"
    before = kept.stat().st_mtime_ns
    answer = json.loads(lost.read_text())["token_ids"]
    lost.unlink()
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 ok, 0 failed, 2 skipped" in resumed.stderr  # the error is skipped too
    assert kept.stat().st_mtime_ns == before
    assert json.loads(lost.read_text())["token_ids"] == answer
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary left"
    skipped = run("--resume")  # the error file counts as done: no engine starts
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "nothing to do: all 3 request(s)" in skipped.stderr

    soundfile.write(broken, tone(1, 16000), 16000, format="WAV")
    retried = run("--resume", "--retry-errors")
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "1 ok, 0 failed, 2 skipped" in retried.stderr
    assert json.loads((out / "bad.json").read_text())["answers"]
    assert not (out / "errors/bad.json").exists()


def test_the_tiny_checkpoint_builder_runs_as_a_script(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/tiny_model.py"), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tiny/model.safetensors").is_file()
