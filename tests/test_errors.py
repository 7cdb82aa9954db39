"""Each mistake users make with flags, models and setup ends in one line
naming the input and the fix, exit code 2, and no engine start. (Bad audio
files are in test_hostile_inputs.py.)"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import run_script

import run_qwen2_audio as tool


def error_of(argv, capsys) -> str:
    assert tool.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def test_missing_file_exits_2_without_traceback(tiny_model):
    result = run_script("--model", tiny_model, "--audio", "/no/such/clip.wav")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: audio /no/such/clip.wav: no such file; check the path"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_more_clips_than_the_limit(tiny_model, clips, capsys):
    argv = [
        "--model",
        tiny_model,
        "--audio",
        clips["a.wav"],
        clips["c.flac"],
        "--limit-mm-per-prompt",
        '{"audio": 1}',
    ]
    err = error_of(argv, capsys)
    assert "2 clips in one prompt but --limit-mm-per-prompt allows 1" in err


def test_more_demo_clips_than_exist(capsys):
    err = error_of(["--audio-count", "3"], capsys)
    assert "vLLM has 2 demo clips" in err and "--audio" in err


def test_demo_clip_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_ASSETS_CACHE", str(tmp_path))
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "3")
    err = error_of(["--audio-count", "1"], capsys)
    assert "demo clip 'mary_had_lamb' could not be downloaded" in err
    assert "--audio" in err and "VLLM_ASSETS_CACHE" in err


def test_model_path_that_does_not_exist(clips, capsys):
    err = error_of(["--model", "/models/qwen2-audio", "--audio", clips["a.wav"]], capsys)
    assert "--model /models/qwen2-audio: no such directory" in err


def test_modelscope_requested_but_missing(clips, monkeypatch, capsys):
    if importlib.util.find_spec("modelscope") is not None:
        pytest.fail("this check needs an environment without modelscope")
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "True")
    err = error_of(["--audio", clips["a.wav"]], capsys)
    assert "pip install modelscope" in err and "VLLM_USE_MODELSCOPE=False" in err
