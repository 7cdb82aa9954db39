"""Each mistake users make ends in one line naming the input and the fix,
exit code 2, and no engine start."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from conftest import CPU_ENV, SCRIPT, run_script

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


def test_text_file_named_wav(tiny_model, tmp_path, capsys):
    (tmp_path / "notes.wav").write_text("these are not samples\n" * 20)
    err = error_of(["--model", tiny_model, "--audio", tmp_path / "notes.wav"], capsys)
    assert "notes.wav: cannot decode it as audio" in err and "ffmpeg" in err


def test_empty_file(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.wav").write_bytes(b"")
    err = error_of(["--model", tiny_model, "--audio", tmp_path / "empty.wav"], capsys)
    assert "empty.wav: empty file" in err


def test_too_short_clip(tiny_model, tmp_path, capsys):
    soundfile.write(tmp_path / "blip.wav", np.zeros(160, np.float32), 16000)
    err = error_of(["--model", tiny_model, "--audio", tmp_path / "blip.wav"], capsys)
    assert "blip.wav: 0.010 s is too short" in err and "at least 0.1 s" in err


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


def test_directory_given_as_clip(tiny_model, tmp_path, capsys):
    err = error_of(["--model", tiny_model, "--audio", tmp_path], capsys)
    assert "is a directory" in err


def test_unreadable_file(tiny_model, clips, tmp_path):
    secret = tmp_path / "secret.wav"
    shutil.copy(clips["a.wav"], secret)
    secret.chmod(0o000)
    # root reads any file; drop the capabilities that let it, as users lack them.
    drop = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]
    result = subprocess.run(
        [
            *(prefix if os.geteuid() == 0 else []),
            sys.executable,
            str(SCRIPT),
            "--model",
            str(tiny_model),
            "--audio",
            str(secret),
            "--dry-run",
        ],
        env={**os.environ, **CPU_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: audio {secret}: permission denied; make it readable"
    )


def test_modelscope_requested_but_missing(clips, monkeypatch, capsys):
    if importlib.util.find_spec("modelscope") is not None:
        pytest.fail("this check needs an environment without modelscope")
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "True")
    err = error_of(["--audio", clips["a.wav"]], capsys)
    assert "pip install modelscope" in err and "VLLM_USE_MODELSCOPE=False" in err
