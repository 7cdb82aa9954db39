"""Each mistake users make with flags, models, outputs and setup ends in one
line naming the input and the fix, exit code 2, no engine start, and no
harm to earlier results. Every case runs `python run_qwen2_audio.py` as a
fresh process in a user's environment. (Bad audio files are in
test_hostile_inputs.py; offline and hub setups in test_air_gapped.py.)"""

from __future__ import annotations

import json

import pytest
from helpers import engine_arguments, one_error_line, run_cli, write_demo_assets


def test_missing_file(tiny_model, home):
    result = run_cli("--model", tiny_model, "--audio", "/no/such/clip.wav", home=home)
    error = one_error_line(result)
    assert error == "error: audio /no/such/clip.wav: no such file; check the path"
    assert result.stderr == error + "\n", "found before vLLM (which logs) is imported"


def test_unreadable_clips_of_one_prompt_are_found_before_vllm(tiny_model, clips, home, tmp_path):
    (tmp_path / "empty.wav").touch()
    for audio, says in [
        (["take.wav"], f"audio {tmp_path}/take.wav: no such file"),  # relative to the cwd
        ([clips["a.wav"], "empty.wav"], f"audio {tmp_path}/empty.wav: empty file (0 bytes)"),
        ([str(tmp_path)], f"audio {tmp_path}: is a directory; pass files, or use --audio-dir"),
    ]:
        result = run_cli("--model", tiny_model, "--audio", *audio, home=home, cwd=tmp_path)
        error = one_error_line(result)
        assert error.startswith(f"error: {says}"), error
        assert result.stderr == error + "\n", "found before vLLM (which logs) is imported"


@pytest.mark.parametrize("dry_run", ["--dry-run", "--dry_run"])  # vLLM's parser takes both
def test_a_dry_run_keeps_its_plan_with_a_missing_clip(tiny_model, home, dry_run):
    result = run_cli("--model", tiny_model, "--audio", "/no/such/clip.wav", dry_run, home=home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert engine_arguments(result.stdout)["max_model_len"] == 4096
    assert "error: audio /no/such/clip.wav: no such file; check the path" in result.stderr


def test_more_clips_than_the_limit(tiny_model, clips, home):
    result = run_cli(
        "--model",
        tiny_model,
        "--audio",
        clips["a.wav"],
        clips["c.flac"],
        "--limit-mm-per-prompt",
        '{"audio": 1}',
        home=home,
    )
    assert "2 clips in one prompt but --limit-mm-per-prompt allows 1" in one_error_line(result)


def test_more_demo_clips_than_exist(tiny_model, home):
    result = run_cli("--model", tiny_model, "--audio-count", "3", home=home)
    error = one_error_line(result)
    assert "vLLM has 2 demo clips" in error and "--audio" in error


def test_demo_clip_not_cached_and_no_network(tiny_model, home):
    result = run_cli("--model", tiny_model, "--audio-count", "1", home=home)
    error = one_error_line(result)
    assert "demo clip 'mary_had_lamb' could not be downloaded" in error
    assert "--audio" in error and f"{home}/.cache/vllm/assets/vllm_public_assets" in error


def test_model_path_that_does_not_exist(clips, home):
    result = run_cli("--model", "/models/qwen2-audio", "--audio", clips["a.wav"], home=home)
    assert "--model /models/qwen2-audio: no such directory" in one_error_line(result)


def test_model_directory_without_a_checkpoint(clips, home, tmp_path):
    result = run_cli("--model", tmp_path, "--audio", clips["a.wav"], home=home)
    error = one_error_line(result)
    assert f"--model {tmp_path}: no config.json in it" in error
    assert result.stderr == error + "\n", "found before vLLM (which logs) is imported"


def test_model_directory_without_a_tokenizer(tiny_model, clips, home, tmp_path):
    broken = tmp_path / "weights-only"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    result = run_cli("--model", broken, "--audio", clips["a.wav"], home=home)
    error = one_error_line(result)
    assert f"--model {broken}: cannot load its tokenizer and audio processor" in error
    assert "copy the whole checkpoint directory" in error


def test_model_directory_without_weights(tiny_model, clips, home, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((tiny_model / "config.json").read_bytes())
    result = run_cli("--model", config_only, "--audio", clips["a.wav"], home=home)
    assert f"--model {config_only}: no weights (*.safetensors) in it" in one_error_line(result)


def test_modelscope_exported_but_not_installed_with_a_hub_id(clips, home):
    result = run_cli("--audio", clips["a.wav"], home=home, env={"VLLM_USE_MODELSCOPE": "True"})
    error = one_error_line(result)
    assert "VLLM_USE_MODELSCOPE=True but the modelscope package is not installed" in error
    assert "pip install modelscope" in error and "VLLM_USE_MODELSCOPE=False" in error


def test_modelscope_exported_but_not_installed_with_a_local_model(tiny_model, clips, home):
    """ModelScope is irrelevant for a local directory: the run just works
    (here a dry run: the engine tests cover real runs)."""
    result = run_cli(
        "--model",
        tiny_model,
        "--audio",
        clips["a.wav"],
        "--dry-run",
        home=home,
        env={"VLLM_USE_MODELSCOPE": "True"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "audio tokens [75]" in result.stdout


EXISTING = '[{"id": "yesterday", "answer": "a day of results"}]\n'


def exit_2_cases(tiny_model, clips, folder):
    """Every way a run ends in exit 2, in every mode."""
    manifest = folder / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "x", "audio": str(clips["a.wav"])}) + "\n")
    model = ["--model", str(tiny_model)]
    return {
        "audio typo": [*model, "--audio", "missing.wav"],
        "manifest typo": [*model, "--manifest", "missing.jsonl"],
        "audio-dir typo": [*model, "--audio-dir", "missing/"],
        "model typo": ["--model", "/no/model", "--audio", str(clips["a.wav"])],
        "bad flag value": [*model, "--audio", str(clips["a.wav"]), "--segment-seconds", "99"],
        "bad shard": [*model, "--manifest", str(manifest), "--shard", "8/8"],
        "too long for max-model-len": [
            *model,
            "--audio",
            str(clips["b.mp3"]),
            "--max-model-len",
            "64",
        ],
        "special tokens": [*model, "--audio", str(clips["a.wav"]), "--question", "<|im_end|>"],
    }


# Each exit-2 path with one output format, every format used: the old file
# must come through each of them byte for byte.
CASES = [
    ("audio typo", ".json"),
    ("manifest typo", ".jsonl"),
    ("audio-dir typo", ".txt"),
    ("model typo", ".json"),
    ("bad flag value", ".jsonl"),
    ("bad shard", ".txt"),
    ("too long for max-model-len", ".json"),
    ("special tokens", ".jsonl"),
]


@pytest.mark.parametrize("case, suffix", CASES)
def test_exit_2_leaves_earlier_results_untouched(case, suffix, tiny_model, clips, home, tmp_path):
    output = tmp_path / f"results{suffix}"
    output.write_text(EXISTING)
    argv = exit_2_cases(tiny_model, clips, tmp_path)[case]
    result = run_cli(*argv, "--output", output, home=home, cwd=tmp_path)
    one_error_line(result)
    assert output.read_text() == EXISTING


def test_exit_2_creates_no_output_file(tiny_model, home, tmp_path):
    output = tmp_path / "new-results.json"
    result = run_cli("--model", tiny_model, "--audio", "missing.wav", "--output", output, home=home)
    one_error_line(result)
    assert not output.exists()


def test_tutorial_with_no_flags_but_no_model_anywhere(home):
    """A new machine: the default hub model is not cached and there is no network."""
    write_demo_assets(home / ".cache/vllm/assets")
    result = run_cli(home=home)
    error = one_error_line(result)
    assert error.startswith("error: --model Qwen/Qwen2-Audio-7B-Instruct: not in the local")
    assert "hf download Qwen/Qwen2-Audio-7B-Instruct" in error and "--model DIR" in error
    assert result.stderr == error + "\n", "found before vLLM (which logs) is imported"
