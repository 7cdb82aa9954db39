"""The hostile-input corpus: every kind of bad (and strange but valid) file an
overnight batch over a data lake meets, made on the spot, nothing downloaded."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile
from helpers import tone

TWO_HOURS = 2 * 3600
NON_UTF8_NAME = b"caf\xe9-latin1.wav"  # "café" in Latin-1: not valid UTF-8


@dataclasses.dataclass
class Case:
    """One hostile input and what the tool must do with it."""

    id: str
    path: Path
    error_type: str | None  # None: valid, must be answered
    message: str = ""  # what the one-line error says after "audio <path>: "
    seconds: float = 0.0  # audio length of a valid case


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def png_bytes() -> bytes:
    """A real 1x1 PNG: the picture someone saved with an .mp3 extension."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def write_two_hour_wav(path: Path) -> None:
    """2 h of 8 kHz speech-like bursts, written a minute at a time (115 MB)."""
    rate = 8000
    t = np.arange(60 * rate) / rate
    with soundfile.SoundFile(path, "w", rate, 1, subtype="PCM_16") as sound:
        for minute in range(TWO_HOURS // 60):
            bursts = np.sin(2 * np.pi * (300 + minute) * t) * (np.sin(2 * np.pi * 0.25 * t) > 0)
            sound.write((0.3 * bursts).astype(np.float32))


def build_corpus(folder: Path, two_hour_wav: Path) -> list[Case]:
    """Every case of the corpus under folder; the 2-hour file is shared."""
    good = wav_bytes(tone(2, 16000), 16000)
    cases = []

    def add(name: str, error_type: str | None, message: str = "", seconds: float = 0.0) -> Path:
        path = folder / name
        cases.append(Case(name.split(".")[0], path, error_type, message, seconds))
        return path

    undecodable = "cannot decode it as audio"
    add("empty.wav", "input_error", "empty file (0 bytes)").write_bytes(b"")
    add("truncated-header.wav", "audio_decode_error", undecodable).write_bytes(good[:30])
    add("text.wav", "audio_decode_error", undecodable).write_text("not samples\n" * 50)
    add("picture.mp3", "audio_decode_error", undecodable).write_bytes(png_bytes())
    add("directory.wav", "input_error", "is a directory").mkdir()
    unreadable = add("unreadable.wav", "input_error", "permission denied; make it readable")
    unreadable.write_bytes(good)
    unreadable.chmod(0)
    with_nan = tone(2, 16000)
    with_nan[1000] = np.nan
    nan_message = "contains NaN or infinite samples; re-export it"
    add("nan.wav", "audio_decode_error", nan_message).write_bytes(
        wav_bytes(with_nan, 16000, "FLOAT")
    )
    with_inf = tone(2, 16000)
    with_inf[5000:5010] = np.inf
    add("inf.wav", "audio_decode_error", nan_message).write_bytes(
        wav_bytes(with_inf, 16000, "FLOAT")
    )
    add("silence.wav", None, seconds=2.0).write_bytes(wav_bytes(np.zeros(32000), 16000))
    add("blip.wav", "input_error", "0.010 s is too short").write_bytes(
        wav_bytes(tone(0.01, 16000), 16000)
    )
    soundfile.write(add("surround-96k.wav", None, seconds=2.0), tone(2, 96000, channels=8), 96000)
    os.symlink(two_hour_wav, add("two-hours.wav", None, seconds=float(TWO_HOURS)))
    loop = add("loop.wav", "input_error", "Too many levels of symbolic links); fix the path")
    os.symlink(loop.name, loop)
    non_utf8 = Path(os.fsdecode(bytes(folder) + b"/" + NON_UTF8_NAME))
    non_utf8.write_bytes(good)
    cases.append(Case("non-utf8-name", non_utf8, None, seconds=2.0))
    return cases


def without_root_read_override() -> list[str]:
    """A command prefix that makes root obey file permissions, as users do."""
    if os.geteuid() != 0:
        return []
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]
