"""Speech the speech model never heard, and how its answers are scored.

tests/speech_model.py trains a tiny Qwen2-Audio on espeak-ng speech. The
hearing tests speak new utterances from its vocabulary.json with other seeds,
other voice settings and other sentences, write them as users' files, run the
CLI on them and score the answers. Plain word error rate over the words
spoken (lower case, one word per word) is the measure here: the tool's own
WER follows Whisper's English normaliser, which writes "one two" as "12" and
so counts a run of digits as one word.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile

RATE = 16000
# The held-out speech of issue 20: voices en-us/en-gb, 150-180 words per
# minute, 3-6 words, seeds the builder never used.
VOICES = ("en-us", "en-gb")
WORDS_PER_MINUTE = (150, 180)
WORDS_PER_UTTERANCE = (3, 6)
GAP_SECONDS = (0.3, 1.5)  # between the utterances of a long recording


@dataclasses.dataclass
class Utterance:
    id: str
    words: list[str]
    samples: np.ndarray  # 16 kHz mono float32, no silence at either end

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclasses.dataclass
class Span:
    """Where one utterance lies in a recording, in seconds."""

    start: float
    end: float
    words: list[str]


@dataclasses.dataclass
class Recording:
    samples: np.ndarray
    spans: list[Span]

    @property
    def words(self) -> list[str]:
        return [word for span in self.spans for word in span.words]


def vocabulary(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "vocabulary.json").read_text())["words"]


def speak(text: str, voice: str, rate: int, pitch: int, wav: Path) -> np.ndarray:
    """One espeak-ng utterance at 16 kHz without its edge silence."""
    import soxr

    command = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(wav), text]
    subprocess.run(command, check=True, capture_output=True)
    samples, espeak_rate = soundfile.read(wav, dtype="float32")
    samples = soxr.resample(samples, espeak_rate, RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 1e-3)
    return samples[loud[0] : loud[-1] + 1]


def utterances(words: list[str], count: int, seed: int, prefix: str = "u") -> list[Utterance]:
    """count random utterances of 3-6 words, voice, rate and pitch drawn per utterance."""
    rng = random.Random(seed)
    plans = [
        (
            [rng.choice(words) for _ in range(rng.randint(*WORDS_PER_UTTERANCE))],
            rng.choice(VOICES),
            rng.randint(*WORDS_PER_MINUTE),
            rng.randint(35, 65),
        )
        for _ in range(count)
    ]
    with tempfile.TemporaryDirectory() as scratch:

        def one(index: int) -> Utterance:
            spoken, voice, rate, pitch = plans[index]
            wav = Path(scratch) / f"{index}.wav"
            samples = speak(" ".join(spoken), voice, rate, pitch, wav)
            return Utterance(f"{prefix}{index:04d}", spoken, samples)

        with ThreadPoolExecutor(max_workers=2) as pool:  # espeak-ng is single-threaded
            return list(pool.map(one, range(count)))


def recording(parts: list[Utterance], seed: int, lead: float = 0.6) -> Recording:
    """The utterances one after another with 0.3-1.5 s of silence between them."""
    rng = random.Random(seed)
    pieces = [np.zeros(round(lead * RATE), np.float32)]
    spans, at = [], lead
    for index, utterance in enumerate(parts):
        if index:
            gap = rng.uniform(*GAP_SECONDS)
            pieces.append(np.zeros(round(gap * RATE), np.float32))
            at += round(gap * RATE) / RATE
        pieces.append(utterance.samples)
        spans.append(Span(at, at + len(utterance.samples) / RATE, utterance.words))
        at += len(utterance.samples) / RATE
    pieces.append(np.zeros(round(lead * RATE), np.float32))
    return Recording(np.concatenate(pieces), spans)


def inside_an_utterance(recording: Recording, at: float) -> bool:
    """Whether a cut at this time falls inside an utterance (20 ms in)."""
    return any(span.start + 0.02 < at < span.end - 0.02 for span in recording.spans)


def words_between(spans: list[Span], start: float, end: float) -> list[str]:
    """The words of the utterances whose middle lies in [start, end)."""
    return [
        word for span in spans if start <= (span.start + span.end) / 2 < end for word in span.words
    ]


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_wav(path: Path, samples: np.ndarray, subtype: str = "PCM_16") -> Path:
    soundfile.write(path, samples, RATE, subtype=subtype)
    return path


def convert(source: Path, target: Path, *ffmpeg_args: str) -> Path:
    """Debian's ffmpeg (tests/run.sh installs it) writes the compressed formats."""
    command = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(source)]
    subprocess.run([*command, *ffmpeg_args, str(target)], check=True, capture_output=True)
    return target


def word_error_rate(references: list[str], answers: list[str]) -> float:
    """Corpus WER over plain lower-case words: edits over all reference words."""
    import jiwer

    return jiwer.wer([r.lower() for r in references], [a.lower() for a in answers])
