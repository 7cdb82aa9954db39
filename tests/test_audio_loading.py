"""Clips reach the engine as 16 kHz mono float32, whatever they were."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from helpers import tone

import run_qwen2_audio as tool

OPTIONS = tool.Options(system_prompt="", url_timeout=10, max_audio_bytes=2**30)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_44k_stereo_tone_becomes_16k_mono_with_its_frequency(tmp_path):
    t = np.arange(2 * 44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    soundfile.write(tmp_path / "tone.wav", np.stack([left, left], 1), 44100)
    clip = tool.load_clip(str(tmp_path / "tone.wav"), OPTIONS)
    assert clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.original_rate == 44100 and clip.original_channels == 2
    assert len(clip.samples) == pytest.approx(2 * 16000, abs=2)
    assert peak_frequency(clip.samples, 16000) == pytest.approx(1000, abs=2)
    assert np.abs(clip.samples).max() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", ["a.wav", "b.mp3", "c.flac", "d.ogg"])
def test_every_format_decodes(clips, name):
    clip = tool.load_clip(str(clips[name]), OPTIONS)
    seconds = soundfile.info(clips[name]).duration
    assert clip.seconds == pytest.approx(seconds, abs=0.06)


def test_long_mp3_loses_no_audio_at_block_boundaries(tmp_path):
    """libsndfile's own MP3s read in 10 s blocks came back with 0.22 s of
    silence after each block (found by the run-batch benchmark: its answers
    differed from this tool's on such files, and only there)."""
    path = tmp_path / "long.mp3"
    soundfile.write(path, tone(25, 16000, 440), 16000)
    whole, _ = soundfile.read(path, dtype="float32")  # one read: no boundary
    clip = tool.load_clip(str(path), OPTIONS)
    assert len(clip.samples) == len(whole)
    quietest = min(
        np.abs(clip.samples[i : i + 1600]).max() for i in range(0, len(whole) - 1600, 800)
    )
    assert quietest > 0.1, "a silent 0.1 s inside a steady tone"
    assert np.abs(clip.samples - whole).max() < 1e-3


@pytest.mark.parametrize(
    ("seconds", "tokens"), [(1, 25), (3, 75), (5, 125), (30, 750), (45, 750), (0.1, 2)]
)
def test_audio_tokens_are_25_per_second_up_to_750(seconds, tokens):
    assert tool.qwen2_audio_tokens(int(seconds * 16000)) == tokens


def test_8_channel_96k_file_is_downmixed(tmp_path):
    soundfile.write(tmp_path / "x.wav", tone(1, 96000, channels=8), 96000)
    clip = tool.load_clip(str(tmp_path / "x.wav"), OPTIONS)
    assert clip.original_channels == 8 and len(clip.samples) == pytest.approx(16000, abs=2)


def test_damaged_mp3_keeps_what_decodes(tmp_path):
    """A download cut off mid-frame, or a burst of garbage, costs the frames
    it hits, not the clip (libsndfile's MP3 decoder skipped them too)."""
    path = tmp_path / "whole.mp3"
    soundfile.write(path, tone(12, 16000, 440), 16000)
    data = path.read_bytes()
    middle = len(data) // 2
    damaged = {
        "cut.mp3": data[: len(data) - 300],
        "garbled.mp3": data[:middle] + bytes(range(256)) * 2 + data[middle + 512 :],
    }
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        clip = tool.load_clip(str(tmp_path / name), OPTIONS)
        assert 10 < clip.seconds <= 12.1, name
