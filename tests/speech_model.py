"""A tiny Qwen2-Audio trained here on synthetic speech, so tests can measure WER.

tests/tiny_model.py has random weights: its answers are noise, fine for comparing
engines token for token but useless for scoring transcripts. This builder speaks a
training set with espeak-ng (several English voices, rates, pitches, word gaps,
some through MP3 or Vorbis), trains the same tiny architecture (four text layers)
on it with transformers on CPU (fixed seeds), and writes a checkpoint that answers
the prompts run_qwen2_audio.py builds (chat and raw, one to three clips) with the
words it heard.

    python tests/speech_model.py DIR        # a copy of the build in DIR
    python tests/speech_model.py --cached   # build into the cache only (tests/run.sh)

The result is cached outside the checkout, keyed by a hash of this file; a cold
build takes about 20 minutes on two cores. DIR also gets vocabulary.json (the words
the model knows) and card.json (how it was made, the answer format, and its held-out
WER measured in transformers).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tiny_model import SPECIAL_TOKENS, save_published_weights  # shared with the random model

# --------------------------------------------------------------------------
# What the model hears and answers
# --------------------------------------------------------------------------

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words that espeak-ng says distinctly from each other and from the digits.
OTHER_WORDS = (
    "apple",
    "banana",
    "cat",
    "dog",
    "green",
    "yellow",
    "purple",
    "house",
    "river",
    "music",
    "happy",
    "window",
    "garden",
    "paper",
    "table",
    "coffee",
    "monkey",
    "tiger",
    "water",
    "orange",
)
WORDS = DIGITS + OTHER_WORDS

VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029")
RATES = (140, 200)  # espeak-ng -s, words per minute (its default is 175)
PITCHES = (25, 75)  # espeak-ng -p, 0-99 (default 50)
WORD_GAPS = (0, 3)  # espeak-ng -g, extra pause between words in units of 10 ms
SENTENCE_WORDS = (2, 6)
SENTENCES_PER_CLIP = (2, 5)  # a multi-sentence clip
PAUSE_SECONDS = (0.2, 1.5)  # between the sentences of a clip
EDGE_SILENCE_SECONDS = (0.0, 1.0)  # before and after a clip: a segment cut at a pause
MAX_CLIP_SECONDS = 11.0  # over the 10 s segments the tests cut
# A noise floor under most clips, white, in dB under full scale (RMS). Lossy
# codecs (MP3, Vorbis) leave noise in the pauses: trained on digital silence
# alone, the model heard that noise as words (WER 37% on MP3 against 9% on
# the same WAVs). Some clips keep digital silence, as synthetic audio has.
NOISE_DBFS = (-85.0, -45.0)
NOISY_SHARE = 0.8
CODED_SHARE = 0.5  # sentences passed through MP3 or Vorbis (see Codec)
CLIPS_PER_PROMPT = (2, 3)  # a prompt with several clips

SAMPLE_RATE = 16000
MEL_HOP = 160
ESPEAK_RATE = 22050
SEPARATOR = " | "  # between the clips' transcripts when a prompt has several

SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_QUESTION = "What is said in the audio?"  # run_qwen2_audio.py's default
QUESTIONS = (
    DEFAULT_QUESTION,
    "Transcribe the speech.",
    "What does the speaker say?",
    "Write down what you hear.",
    "Transcribe the audio.",
    "Please transcribe this audio.",
    "What is recited in the audio?",
    "What words are spoken?",
    "Recognize the speech.",
    "Detect the language and recognize the speech: <|en|>",
)

AUDIO_PART = "<|audio_bos|><|AUDIO|><|audio_eos|>"
# Qwen2-Audio-7B-Instruct's published chat template, with the test for
# {"type": "audio"} parts that transformers' default one has (below).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    # vLLM's chat path (its OpenAI server, run-batch) passes {"type": "audio"}
    # parts: without the type test its prompt had no audio placeholder.
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The knobs of one build (a smaller one makes a quick experiment)."""

    train_sentences: int = 2000
    heldout_utterances: int = 100  # half single sentences, half multi-sentence clips
    heldout_several_clips: int = 10  # prompts with 2-3 clips, reported apart
    # Lessons in order, (lesson, steps): one sentence per clip until the model
    # listens, then what the tests ask (see random_example). On the full mix
    # from the start it sits for long on the words' prior.
    lessons: tuple[tuple[str, int], ...] = (("sentence", 800), ("mix", 3600))
    batch_size: int = 16
    learning_rate: float = 1e-3  # at 3e-3 it never left the prior in 1,500 steps
    warmup_steps: int = 100
    seed: int = 0
    heldout_seed: int = 1000

    @property
    def steps(self) -> int:
        return sum(steps for _, steps in self.lessons)


RECIPE = Recipe()

# The tests' tiny sizes (head_dim 64 in the text model: vLLM's CPU attention needs it).
AUDIO_CONFIG = {
    "model_type": "qwen2_audio_encoder",
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "num_mel_bins": 128,
    "max_source_positions": 1500,
}
TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    # Four layers, not tests/tiny_model.py's two: finding the next word's audio
    # in a clip of several sentences is learnt in a third of the steps.
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
}
# Feature frames kept past a clip's last one: the encoder's two convolutions read
# two frames beyond it, which are the extractor's padding at inference too.
FRAME_MARGIN = 8
AUDIO_INIT_STD = 0.2  # the audio path's weights at initialisation (see build_model)
BATCHES_PER_POOL = 16  # examples drawn at once, then cut into length-sorted batches
LOG_EVERY = 250  # steps


# --------------------------------------------------------------------------
# Cache: one build per version of this file
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """Where the project's test caches live (as tests/run.sh computes it)."""
    if os.environ.get("RQA_CACHE"):
        return Path(os.environ["RQA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "run_qwen2_audio"


def source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


# The version of the code this process runs: read once, so that an edit of the
# file during a 20-minute build cannot label the build with the new version.
VERSION = source_hash()


def cached_build() -> Path:
    """The cached checkpoint of this builder's version, built first if missing."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"speech-model-{VERSION}"
    with open(root / f"{final.name}.lock", "w") as lock:
        # One build at a time: a second caller (a parallel test worker) waits
        # here, then finds the finished build instead of starting its own.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(final):
            return final
        for leftover in root.glob(f"{final.name}.tmp-*"):  # from a killed build
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
        try:
            build(staging)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete copy, if any
            staging.rename(final)  # atomic: readers see all of it or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def is_complete(directory: Path) -> bool:
    card = directory / "card.json"
    return card.is_file() and json.loads(card.read_text()).get("builder_hash") == VERSION


def remove_other_versions(root: Path, version: str) -> None:
    """Builds of other versions of this file, unless one is in use (a build
    or a copy holds its lock): a checkout of another version may still need it.
    Lock files stay (empty): one unlinked while another process waits on it
    would let a third create a new one and hold "the" lock beside it."""
    for lock_path in root.glob("speech-model-*.lock"):
        name = lock_path.name.removesuffix(".lock")
        if name == f"speech-model-{version}":
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for path in [root / name, *root.glob(f"{name}.tmp-*")]:
                shutil.rmtree(path, ignore_errors=True)


def install(directory: Path) -> Path:
    """Put the checkpoint into directory (a copy of the cached build), then
    remove other versions' builds nobody uses."""
    started = time.monotonic()
    for _ in range(3):
        source = cached_build()
        with open(source.parent / f"{source.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # no other version's build removes it meanwhile
            # Between the build's lock and this one, another version's
            # cleanup may have found it unused and removed it: build again.
            if is_complete(source):
                directory.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source, directory, dirs_exist_ok=True)
                break
    else:
        raise RuntimeError(f"{source}: removed three times before it could be copied")
    remove_other_versions(source.parent, VERSION)
    log(f"{directory}: checkpoint from {source} ({time.monotonic() - started:.1f} s)")
    return directory


def log(message: str) -> None:
    print(f"speech_model: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Speech: espeak-ng sentences, joined into clips
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Sentence:
    words: list[str]
    voice: str
    samples: np.ndarray  # 16 kHz mono float32, its own edge silence trimmed


@dataclasses.dataclass
class Example:
    """One prompt: its clips, each clip's words, and the prompt text."""

    clips: list[np.ndarray]
    words: list[list[str]]
    prompt: str
    kind: str

    @property
    def answer(self) -> str:
        """What the model learns to say: each clip's words, joined by SEPARATOR."""
        return SEPARATOR.join(" ".join(words) for words in self.words)


def random_words(rng: random.Random, lengths: tuple[int, int] = SENTENCE_WORDS) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(*lengths))]


def speak(
    text: str, voice: str, rate: int, pitch: int, gap: int, codec: Codec | None, wav: Path
) -> np.ndarray:
    """One espeak-ng utterance at 16 kHz, without its leading and trailing silence."""
    import soundfile
    import soxr

    command = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-g", str(gap)]
    subprocess.run([*command, "-w", str(wav), text], check=True, capture_output=True)
    samples, rate_read = soundfile.read(wav, dtype="float32")
    samples = soxr.resample(samples, rate_read, SAMPLE_RATE).astype(np.float32)
    if codec is not None:
        samples = codec.round_trip(samples)
    loud = np.flatnonzero(np.abs(samples) > 1e-3)
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


@dataclasses.dataclass(frozen=True)
class Codec:
    """A lossy round trip as users' files have had: MP3 or Vorbis at a music
    rate. Trained with the white noise floor alone, the model lost 8 points of
    WER on MP3 and 4 on Vorbis against the same words as WAV: a codec's
    artefacts are not white noise."""

    name: str  # "mp3" or "vorbis"
    rate: int
    compression: float  # soundfile's compression_level: 0 best quality, 1 smallest

    def round_trip(self, samples: np.ndarray) -> np.ndarray:
        import io

        import soundfile
        import soxr

        container, subtype = {"mp3": ("MP3", "MPEG_LAYER_III"), "vorbis": ("OGG", "VORBIS")}[
            self.name
        ]
        buffer = io.BytesIO()
        high = soxr.resample(samples, SAMPLE_RATE, self.rate)
        soundfile.write(
            buffer,
            high,
            self.rate,
            format=container,
            subtype=subtype,
            compression_level=self.compression,
        )
        buffer.seek(0)
        decoded, _ = soundfile.read(buffer, dtype="float32")
        return soxr.resample(decoded, self.rate, SAMPLE_RATE).astype(np.float32)


def random_codec(rng: random.Random) -> Codec | None:
    if rng.random() >= CODED_SHARE:
        return None
    return Codec(rng.choice(("mp3", "vorbis")), rng.choice((44100, 48000)), rng.uniform(0.2, 0.8))


def speak_sentences(
    count: int, seed: int, lengths: tuple[int, int] = SENTENCE_WORDS
) -> list[Sentence]:
    """count random sentences, each in a random voice, rate, pitch and word gap."""
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        words = random_words(rng, lengths)
        voice = VOICES[index % len(VOICES)]  # every voice equally often
        settings = (
            rng.randint(*RATES),
            rng.randint(*PITCHES),
            rng.randint(*WORD_GAPS),
            random_codec(rng),
        )
        plans.append((words, voice, settings))
    with tempfile.TemporaryDirectory() as scratch:

        def run(index: int) -> Sentence:
            words, voice, settings = plans[index]
            wav = Path(scratch) / f"{index}.wav"
            return Sentence(words, voice, speak(" ".join(words), voice, *settings, wav))

        # Two at a time: espeak-ng is single-threaded and the machine has two cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(run, range(count)))


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def join_sentences(sentences: list[Sentence], rng: random.Random) -> tuple[np.ndarray, list[str]]:
    """A clip: the sentences with pauses between them and silence at both ends."""
    parts = [silence(rng.uniform(*EDGE_SILENCE_SECONDS))]
    for index, sentence in enumerate(sentences):
        if index:
            parts.append(silence(rng.uniform(*PAUSE_SECONDS)))
        parts.append(sentence.samples)
    parts.append(silence(rng.uniform(*EDGE_SILENCE_SECONDS)))
    words = [word for sentence in sentences for word in sentence.words]
    return add_noise(np.concatenate(parts), rng), words


def add_noise(samples: np.ndarray, rng: random.Random) -> np.ndarray:
    if rng.random() >= NOISY_SHARE:
        return samples
    level = 10 ** (rng.uniform(*NOISE_DBFS) / 20)
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(samples))
    return (samples + level * noise).astype(np.float32)


def several_sentences(by_voice: dict[str, list[Sentence]], rng: random.Random) -> list[Sentence]:
    """2-5 sentences of one voice, as many as fit in MAX_CLIP_SECONDS with pauses."""
    pool = by_voice[rng.choice(VOICES)]
    chosen: list[Sentence] = []
    budget = MAX_CLIP_SECONDS * SAMPLE_RATE - 2 * EDGE_SILENCE_SECONDS[1] * SAMPLE_RATE
    for _ in range(rng.randint(*SENTENCES_PER_CLIP)):
        sentence = rng.choice(pool)
        needed = len(sentence.samples) + (PAUSE_SECONDS[1] * SAMPLE_RATE if chosen else 0)
        if chosen and needed > budget:
            break
        chosen.append(sentence)
        budget -= needed
    return chosen


def chat_prompt(question: str, num_clips: int) -> str:
    """run_qwen2_audio.build_prompt with the default system prompt."""
    audio_lines = "".join(f"Audio {i + 1}: {AUDIO_PART}\n" for i in range(num_clips))
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"{audio_lines}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def raw_prompt(question: str, num_clips: int) -> str:
    """run_qwen2_audio.raw_prompt: the base model's format, no chat markup."""
    return AUDIO_PART * num_clips + question


def make_example(
    clips: list[tuple[np.ndarray, list[str]]], kind: str, rng: random.Random, chat: bool = True
) -> Example:
    """A prompt asking for the clips' words."""
    # The CLI's default question half the time, so that it is learnt best.
    question = DEFAULT_QUESTION if rng.random() < 0.5 else rng.choice(QUESTIONS)
    prompt = (chat_prompt if chat else raw_prompt)(question, len(clips))
    return Example([samples for samples, _ in clips], [words for _, words in clips], prompt, kind)


def random_example(
    sentences: dict[str, list[Sentence]], lesson: str, rng: random.Random
) -> Example:
    """A training example of a lesson: "sentence" (one sentence in a clip) or
    "mix" (what the tests ask: 25% one sentence, 55% 2-5 sentences with pauses
    as a long recording's segment, 20% prompts of 2-3 clips)."""
    chat = rng.random() < 0.85  # raw prompts are the base model's; rarer in use
    draw = rng.random() if lesson == "mix" else 0.0
    if draw < 0.25:
        sentence = rng.choice(sentences[rng.choice(VOICES)])
        return make_example([join_sentences([sentence], rng)], "single", rng, chat)
    if draw < 0.8:
        clip = join_sentences(several_sentences(sentences, rng), rng)
        return make_example([clip], "multi", rng, chat)
    clips = []
    for _ in range(rng.randint(*CLIPS_PER_PROMPT)):
        pool = sentences[rng.choice(VOICES)]
        count = 1 if rng.random() < 0.7 else 2
        clips.append(join_sentences([rng.choice(pool) for _ in range(count)], rng))
    return make_example(clips, "several", rng, chat)


def heldout_examples(sentences: list[Sentence], recipe: Recipe) -> list[Example]:
    """Utterances never trained on (their own seed), all with the CLI's default chat prompt."""
    rng = random.Random(recipe.heldout_seed)
    by_voice = group_by_voice(sentences)
    examples = []
    for index in range(recipe.heldout_utterances):
        if index % 2 == 0:
            clip = join_sentences([rng.choice(by_voice[rng.choice(VOICES)])], rng)
            kind = "single"
        else:
            clip = join_sentences(several_sentences(by_voice, rng), rng)
            kind = "multi"
        examples.append(Example([clip[0]], [clip[1]], chat_prompt(DEFAULT_QUESTION, 1), kind))
    for _ in range(recipe.heldout_several_clips):
        count = rng.randint(*CLIPS_PER_PROMPT)
        clips = [join_sentences([rng.choice(sentences)], rng) for _ in range(count)]
        samples, words = zip(*clips, strict=True)
        prompt = chat_prompt(DEFAULT_QUESTION, count)
        examples.append(Example(list(samples), list(words), prompt, "several"))
    return examples


def group_by_voice(sentences: list[Sentence]) -> dict[str, list[Sentence]]:
    return {voice: [s for s in sentences if s.voice == voice] for voice in VOICES}


# --------------------------------------------------------------------------
# Tokenizer, processor, model
# --------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """Every prompt the CLI builds, every question, and sentences of the vocabulary,
    so that each word and each piece of markup is one or a few tokens."""
    rng = random.Random(0)
    corpus = [chat_prompt(q, n) for q in QUESTIONS for n in (1, 2, 3)]
    corpus += [raw_prompt(q, 1) for q in QUESTIONS]
    corpus += [SEPARATOR.join(" ".join(random_words(rng)) for _ in range(2)) for _ in range(100)]
    corpus += [" ".join(random_words(rng)) for _ in range(300)]
    return corpus * 2


def build_tokenizer():
    """A byte-level BPE like tests/tiny_model.py's, with Qwen2-Audio's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer):
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=MEL_HOP, chunk_length=30, n_fft=400
    )
    return Qwen2AudioProcessor(extractor, tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer):
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2AudioConfig(
        audio_config=AUDIO_CONFIG,
        text_config={**TEXT_CONFIG, "eos_token_id": eos},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.eos_token_id = eos
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    model = Qwen2AudioForConditionalGeneration(config)
    # transformers' std 0.02 suits wide layers; in 64-wide ones the sound
    # stays far quieter than the encoder's (frozen, random) positions, and the
    # decoder takes many hundred steps to start listening. Measured, the loss
    # at step 750 of one-sentence clips (50-step means; the prior is ~2.9):
    # 0.86 at std 0.2, 1.08 at 0.3, 1.19 at 0.1, 2.87 at 0.02.
    with torch.no_grad():
        tower = model.model.audio_tower
        for module in [*tower.modules(), *model.model.multi_modal_projector.modules()]:
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear)):
                module.weight.normal_(0.0, AUDIO_INIT_STD)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_checkpoint(model, processor, directory: Path) -> None:
    """Config, tokenizer, processor and weights in the published checkpoint's layout."""
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    processor.save_pretrained(directory)
    save_published_weights(model, directory)


# --------------------------------------------------------------------------
# Training: the batch's own frames only
# --------------------------------------------------------------------------


def audio_token_count(frames: int) -> int:
    """Audio tokens for a clip of this many mel frames (run_qwen2_audio's rule)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def prompt_ids(tokenizer, example: Example, frames: list[int]) -> list[int]:
    """The prompt's ids with each <|AUDIO|> repeated once per audio token of its
    clip, as the processor (and vLLM) expand it."""
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ids: list[int] = []
    counts = iter(frames)
    for token in tokenizer(example.prompt, add_special_tokens=False).input_ids:
        if token == audio_id:
            ids += [audio_id] * audio_token_count(next(counts))
        else:
            ids.append(token)
    return ids


def make_batch(examples: list[Example], tokenizer, extractor) -> dict[str, Any]:
    """Tensors for the training losses: features cut to the batch's longest clip (plus
    FRAME_MARGIN), token ids right-padded, labels only on the answers."""
    import torch

    clips = [clip for example in examples for clip in example.clips]
    frames = [math.ceil(len(clip) / MEL_HOP) for clip in clips]
    width = max(frames) + FRAME_MARGIN
    width += width % 2  # whole pairs of frames for the encoder's stride
    # Padding to width instead of 30 s changes no kept frame: the extractor
    # scales each clip by its own loudest frame, and the padding is silence.
    features = extractor(
        clips,
        sampling_rate=SAMPLE_RATE,
        padding="max_length",
        max_length=width * MEL_HOP,
        return_tensors="pt",
    ).input_features
    rows, labels = [], []
    start = 0
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in examples:
        prompt = prompt_ids(tokenizer, example, frames[start : start + len(example.clips)])
        start += len(example.clips)
        answer = tokenizer(example.answer, add_special_tokens=False).input_ids + [eos]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "features": features,
        "frames": torch.tensor(frames),
        "input_ids": torch.tensor([row + [pad] * (length - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([row + [-100] * (length - len(row)) for row in labels]),
    }


def audio_embeddings(model, features, frames):
    """Qwen2AudioEncoder + projector on the batch's own frames, not on 3,000.

    transformers' encoder insists on 30 s of features. At inference, frames
    past a clip's end are masked out of attention (feature_attention_mask), so
    the kept tokens do not depend on how much padding follows: this forward
    gives the same tokens at a fraction of the cost. Returns (clips, tokens,
    hidden) and each clip's count of audio tokens (the rest is padding).
    """
    import torch
    from torch import nn
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    hidden = nn.functional.gelu(tower.conv1(features))
    hidden = nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
    positions = hidden.shape[1]
    hidden = hidden + tower.embed_positions.weight[:positions]
    after_conv, token_counts = tower._get_feat_extract_output_lengths(frames)
    valid = torch.arange(positions)[None, :] < after_conv[:, None]
    mask = create_bidirectional_mask(
        config=tower.config, inputs_embeds=hidden, attention_mask=valid.long()
    )
    for layer in tower.layers:
        hidden = layer(hidden, mask)
    hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
    hidden = model.model.multi_modal_projector(tower.layer_norm(hidden))
    return hidden, token_counts


def answer_loss(model, batch: dict[str, Any], audio, token_counts):
    """Mean cross-entropy of the answer tokens (what transformers' forward gives)."""
    import torch
    from torch import nn

    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    kept = torch.arange(audio.shape[1])[None, :] < token_counts[:, None]
    audio_slots = (input_ids == model.config.audio_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(audio_slots, audio[kept].to(embeds.dtype))
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    # The head only where there is something to predict: the answers.
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])
    return nn.functional.cross_entropy(logits, targets[scored])


def check_training_loss(model, processor, examples: list[Example]) -> float:
    """The fast loss against transformers' own forward on 30 s features, with the
    ids and feature mask the processor makes at inference. Returns the difference."""
    import torch

    tokenizer = processor.tokenizer
    batch = make_batch(examples, tokenizer, processor.feature_extractor)
    clips = [clip for example in examples for clip in example.clips]
    inputs = processor(
        text=[example.prompt for example in examples],
        audio=clips,
        sampling_rate=SAMPLE_RATE,
        padding=True,
        return_tensors="pt",
    )
    for row, example in enumerate(examples):
        prompt = inputs.input_ids[row][inputs.attention_mask[row] == 1].tolist()
        if batch["input_ids"][row, : len(prompt)].tolist() != prompt:
            raise AssertionError(f"training ids differ from the processor's for {example.prompt}")
    with torch.no_grad():
        audio, token_counts = audio_embeddings(model, batch["features"], batch["frames"])
        fast = answer_loss(model, batch, audio, token_counts).item()
        full = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=inputs.input_features,
            feature_attention_mask=inputs.feature_attention_mask,
            labels=batch["labels"],
        ).loss.item()
    if abs(fast - full) > 1e-4:
        raise AssertionError(f"training loss {fast} != transformers' forward {full}")
    return abs(fast - full)


def length_sorted_batches(
    sentences: dict[str, list[Sentence]], lesson: str, rng: random.Random, batch_size: int
) -> Iterator[list[Example]]:
    """Endless random batches of similar length: a batch is padded to its longest
    clip and prompt, so mixing 1 s and 12 s clips would waste most of a step."""
    while True:
        size = batch_size * BATCHES_PER_POOL
        pool = [random_example(sentences, lesson, rng) for _ in range(size)]
        pool.sort(key=lambda example: sum(len(clip) for clip in example.clips))
        groups = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(groups)
        yield from groups


def train(model, processor, sentences: dict[str, list[Sentence]], recipe: Recipe) -> list[float]:
    """AdamW, warm-up then cosine decay, through the recipe's lessons in order."""
    import torch

    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)

    def schedule(step: int) -> float:
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        return warmup * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    for lesson, steps in recipe.lessons:
        batches = length_sorted_batches(sentences, lesson, rng, recipe.batch_size)
        for _ in range(steps):
            examples = next(batches)
            batch = make_batch(examples, processor.tokenizer, processor.feature_extractor)
            audio, token_counts = audio_embeddings(model, batch["features"], batch["frames"])
            loss = answer_loss(model, batch, audio, token_counts)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if len(losses) % LOG_EVERY == 0:
                elapsed = time.monotonic() - started
                mean = sum(losses[-LOG_EVERY:]) / LOG_EVERY
                step = f"step {len(losses)}/{recipe.steps} ({lesson})"
                log(f"{step}: loss {mean:.3f}, {elapsed:.0f} s")
    model.eval()
    return losses


# --------------------------------------------------------------------------
# Held-out evaluation in transformers
# --------------------------------------------------------------------------


def transcribe(model, processor, examples: list[Example], batch_size: int = 10) -> list[str]:
    """Greedy answers from transformers' generate, on the processor's 30 s features."""
    import torch

    processor.tokenizer.padding_side = "left"  # generation continues each row's end
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = processor(
            text=[example.prompt for example in chunk],
            audio=[clip for example in chunk for clip in example.clips],
            sampling_rate=SAMPLE_RATE,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=96, do_sample=False)
        new_tokens = output[:, inputs.input_ids.shape[1] :]
        answers += processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    processor.tokenizer.padding_side = "right"
    return [answer.strip() for answer in answers]


def word_error_rate(references: list[str], answers: list[str]) -> float:
    import jiwer

    return jiwer.wer([r.lower() for r in references], [a.lower() for a in answers])


def evaluate(model, processor, examples: list[Example]) -> dict[str, Any]:
    answers = transcribe(model, processor, examples)
    result: dict[str, Any] = {}
    for kind in ("single", "multi", "several"):
        pairs = [(e.answer, a) for e, a in zip(examples, answers, strict=True) if e.kind == kind]
        if pairs:
            references, hypotheses = map(list, zip(*pairs, strict=True))
            result[kind] = {
                "utterances": len(pairs),
                "wer": round(word_error_rate(references, hypotheses), 4),
            }
    one_clip = [(e.answer, a) for e, a in zip(examples, answers, strict=True) if len(e.clips) == 1]
    references, hypotheses = map(list, zip(*one_clip, strict=True))
    result["utterances"] = len(one_clip)
    result["wer"] = round(word_error_rate(references, hypotheses), 4)
    result["examples"] = [
        {"reference": e.answer, "answer": a}
        for e, a in zip(examples[:3] + examples[-2:], answers[:3] + answers[-2:], strict=True)
    ]
    return result


# --------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def check_tools() -> None:
    """What the build needs, said before minutes of work: espeak-ng and its
    voices, and a libsndfile that writes MP3 (for Codec)."""
    import soundfile

    try:
        listed = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("speech_model: espeak-ng is missing: apt-get install espeak-ng")
    known = {line.split()[1] for line in listed.stdout.splitlines()[1:] if line.split()}
    missing = [voice for voice in VOICES if voice not in known]
    if missing:
        sys.exit(f"speech_model: espeak-ng has no voice {', '.join(missing)}")
    if "MPEG_LAYER_III" not in soundfile.available_subtypes("MP3"):
        sys.exit("speech_model: this libsndfile cannot write MP3; install soundfile >= 0.13")


def build(directory: Path, recipe: Recipe = RECIPE) -> Path:
    """Speak, train, check, evaluate and save into directory."""
    check_tools()
    started = time.monotonic()
    seed_everything(recipe.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)

    sentences = group_by_voice(speak_sentences(recipe.train_sentences, recipe.seed))
    heldout = speak_sentences(recipe.heldout_utterances, recipe.heldout_seed)
    spoken = time.monotonic() - started
    log(f"{recipe.train_sentences + len(heldout)} sentences spoken in {spoken:.0f} s")

    losses = train(model, processor, sentences, recipe)
    trained = time.monotonic() - started
    # Checked on the trained model, whose answers depend on the audio (at
    # initialisation they hardly do, and a leak would not show).
    check_rng = random.Random(recipe.seed + 1)
    check_batch = [random_example(sentences, "mix", check_rng) for _ in range(6)]
    difference = check_training_loss(model, processor, check_batch)
    log(f"fast training loss matches transformers' forward (|difference| {difference:.1e})")
    scores = evaluate(model, processor, heldout_examples(heldout, recipe))
    log(f"held-out WER {scores['wer']:.2%} on {scores['utterances']} utterances")

    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, processor, directory)
    (directory / "vocabulary.json").write_text(json.dumps({"words": list(WORDS)}, indent=2))
    card = model_card(recipe, scores, losses, spoken, trained, time.monotonic() - started)
    card["training"]["loss_check_difference"] = difference
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return directory


def model_card(
    recipe: Recipe,
    scores: dict[str, Any],
    losses: list[float],
    spoken: float,
    trained: float,
    total: float,
) -> dict[str, Any]:
    return {
        "what": "tiny Qwen2-Audio trained on espeak-ng speech by tests/speech_model.py",
        "builder_hash": VERSION,
        "words": list(WORDS),
        "speech": {
            "engine": "espeak-ng, each sentence its own call, resampled to 16 kHz with soxr",
            "voices": list(VOICES),
            "rate_wpm": list(RATES),
            "pitch": list(PITCHES),
            "word_gap_10ms": list(WORD_GAPS),
            "words_per_sentence": list(SENTENCE_WORDS),
            "sentences_per_clip": list(SENTENCES_PER_CLIP),
            "pause_seconds": list(PAUSE_SECONDS),
            "edge_silence_seconds": list(EDGE_SILENCE_SECONDS),
            "max_clip_seconds": MAX_CLIP_SECONDS,
            "silence": "espeak-ng's own edge silence trimmed, then digital zeros for pauses "
            "and edges, under the noise floor in noisy_share of the clips",
            "noise_floor_dbfs": list(NOISE_DBFS),
            "lossy_share": CODED_SHARE,
            "lossy": "MP3 or Vorbis at 44.1/48 kHz, soundfile compression_level 0.2-0.8",
            "noisy_share": NOISY_SHARE,
            "train_sentences": recipe.train_sentences,
            "seed": recipe.seed,
            "heldout_seed": recipe.heldout_seed,
        },
        "prompts": {
            "formats": ["chat (run_qwen2_audio.build_prompt)", "raw (run_qwen2_audio.raw_prompt)"],
            "system_prompt": SYSTEM_PROMPT,
            "questions": list(QUESTIONS),
            "clips_per_prompt": [1, CLIPS_PER_PROMPT[1]],
        },
        "answer": {
            "format": "the words heard, lower case, separated by single spaces, then <|im_end|>",
            "several_clips": f"each clip's words in clip order, joined by {SEPARATOR!r}",
            "separator": SEPARATOR,
            "example": SEPARATOR.join(["one two cat", "green house"]),
        },
        "model": {"audio_config": AUDIO_CONFIG, "text_config": TEXT_CONFIG},
        "training": {
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "optimizer": "AdamW, weight decay 0.01, grad clip 1.0",
            "learning_rate": recipe.learning_rate,
            "warmup_steps": recipe.warmup_steps,
            "lessons": [{"lesson": name, "steps": steps} for name, steps in recipe.lessons],
            "mix": "25% one sentence, 55% 2-5 sentences with pauses, 20% 2-3 clips; 15% raw",
            "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
            "torch_threads": min(2, os.cpu_count() or 1),
            "speech_seconds": round(spoken, 1),
            "train_seconds": round(trained - spoken, 1),
            "total_seconds": round(total, 1),
        },
        "heldout": {
            "engine": "transformers generate, greedy, CLI's default chat prompt",
            "metric": "jiwer WER on lower-cased text",
            **scores,
        },
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: speech_model.py DIR (or --cached: build into the cache only)")
    if sys.argv[1] == "--cached":
        built = cached_build()
        remove_other_versions(built.parent, VERSION)
        log(f"checkpoint in {built}")
    else:
        install(Path(sys.argv[1]))
