"""A tiny Qwen3-ASR trained here on the speech model's spoken corpus, so the
Qwen3-ASR profile's answers can be scored as words, as Qwen2-Audio's are.

tests/tiny_qwen3_asr.py has the published layout and random weights: fine for
comparing engines token for token, useless for WER. This builder speaks the
same training sentences as tests/speech_model.py (its voices, rates, pauses,
noise floor and codecs), trains the same tiny Qwen3-ASR with four text layers
on them with transformers on CPU (fixed seeds), and writes a checkpoint in the
published layout (thinker_config, thinker.* weights) that answers the prompt
run_qwen2_audio.py builds for Qwen3-ASR as the real model does:
"language English<asr_text>" and the words, or the words alone after a forced
"language English<asr_text>". One clip per prompt (the profile takes one).

    python tests/speech_model_qwen3_asr.py DIR        # a copy of the build in DIR
    python tests/speech_model_qwen3_asr.py --cached   # build into the cache only

Cached as tests/build_cache.py says, keyed by this file, tests/speech_model.py
(the speech) and tests/tiny_qwen3_asr.py (the layout); a cold build takes
about 15 minutes on two cores. DIR gets vocabulary.json and card.json too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import build_cache
import numpy as np
import speech_model as speech
import tiny_qwen3_asr as tiny

NAME = "qwen3-asr-speech-model"
HERE = Path(__file__).resolve().parent
VERSION = build_cache.source_hash(
    Path(__file__), HERE / "speech_model.py", HERE / "tiny_qwen3_asr.py"
)

# Lessons as tests/speech_model.py's: one sentence a clip until the model
# listens, then what the tests ask (see random_example). Clips of at most
# MULTI_SENTENCES sentences, not the speech model's 2-5 (up to 11 s): the
# tests split long audio at 5 s, and on the longer clips 3,000 steps left
# held-out WER at 13.4% (16.5% on them, 4.6% on one sentence), a step costing
# 0.31 s against 0.2 s here.
RECIPE = speech.Recipe(lessons=(("sentence", 600), ("mix", 3000)), heldout_several_clips=0)
MULTI_SENTENCES = (2, 3)
TEXT_CONFIG = {**tiny.TEXT_CONFIG, "num_hidden_layers": 4}  # as the speech model's
# Twice the random checkpoint's channels in the encoder's convolutions: at 32,
# the loss after 750 one-sentence steps was 1.34, at 64 0.49 (0.27 s a step
# against 0.15); at std 0.02 for the audio path 1.74, at learning rate 2e-3 1.49.
AUDIO_CONFIG = {**tiny.AUDIO_CONFIG, "downsample_hidden_size": 64}
FORCED_SHARE = 0.2  # prompts that force the language (a manifest's "language")
ANSWER_HEAD = tiny.LANGUAGE_PREFIX  # "language English<asr_text>": what it says first
CHUNK_FRAMES = 100  # the encoder reads mel frames in chunks of 2 * n_window


def log(message: str) -> None:
    print(f"speech_model_qwen3_asr: {message}", file=sys.stderr, flush=True)


def cached_build() -> Path:
    return build_cache.cached_build(NAME, VERSION, build)


def install(directory: Path) -> Path:
    """Put the checkpoint into directory (a copy of the cached build)."""
    return build_cache.install(directory, NAME, VERSION, build, log)


# --------------------------------------------------------------------------
# Examples: one clip, its words, the prompt
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    clip: np.ndarray  # whole mel frames (see whole_frames)
    words: list[str]
    forced: bool  # the prompt ends with ANSWER_HEAD; the answer is the words alone
    kind: str  # "single" or "multi" (several sentences with pauses)

    @property
    def prompt(self) -> str:
        return tiny.PROMPT + (ANSWER_HEAD if self.forced else "")

    @property
    def answer(self) -> str:
        words = " ".join(self.words)
        return words if self.forced else ANSWER_HEAD + words


def whole_frames(clip: np.ndarray) -> np.ndarray:
    """The clip cut to whole mel frames (160 samples). Of a partial last
    frame transformers' processor keeps none (padding="longest") and vLLM
    0.23 a padded one; the trailing few ms are a clip's edge silence."""
    return clip[: len(clip) // speech.MEL_HOP * speech.MEL_HOP]


def random_example(
    sentences: dict[str, list[speech.Sentence]], lesson: str, rng: random.Random
) -> Example:
    """A training example of a lesson: "sentence" (one sentence a clip) or
    "mix" (40% one sentence, 60% 2-3 sentences with pauses, as a segment of
    a long recording split at 5 s)."""
    forced = rng.random() < FORCED_SHARE
    if lesson == "sentence" or rng.random() < 0.4:
        sentence = rng.choice(sentences[rng.choice(speech.VOICES)])
        clip, words = speech.join_sentences([sentence], rng)
        return Example(whole_frames(clip), words, forced, "single")
    clip, words = speech.join_sentences(several_sentences(sentences, rng), rng)
    return Example(whole_frames(clip), words, forced, "multi")


def several_sentences(
    by_voice: dict[str, list[speech.Sentence]], rng: random.Random
) -> list[speech.Sentence]:
    """2-3 sentences of one voice (3-7 s with the pauses between them)."""
    pool = by_voice[rng.choice(speech.VOICES)]
    return [rng.choice(pool) for _ in range(rng.randint(*MULTI_SENTENCES))]


def heldout_examples(sentences: list[speech.Sentence], recipe: speech.Recipe) -> list[Example]:
    """Utterances never trained on (their own seed), with the CLI's default prompt."""
    rng = random.Random(recipe.heldout_seed)
    by_voice = speech.group_by_voice(sentences)
    examples = []
    for index in range(recipe.heldout_utterances):
        if index % 2 == 0:
            chosen, kind = [rng.choice(by_voice[rng.choice(speech.VOICES)])], "single"
        else:
            chosen, kind = several_sentences(by_voice, rng), "multi"
        clip, words = speech.join_sentences(chosen, rng)
        examples.append(Example(whole_frames(clip), words, False, kind))
    return examples


def length_sorted_batches(
    sentences: dict[str, list[speech.Sentence]], lesson: str, rng: random.Random, batch_size: int
) -> Iterator[list[Example]]:
    """Endless random batches of similar length (a batch is padded to its longest clip)."""
    while True:
        pool = [random_example(sentences, lesson, rng) for _ in range(batch_size * 16)]
        pool.sort(key=lambda example: len(example.clip))
        groups = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(groups)
        yield from groups


# --------------------------------------------------------------------------
# Tokenizer, feature extractor, model
# --------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """The published corpus, the prompts and sentences of the vocabulary, so
    that each word is one or a few tokens."""
    rng = random.Random(0)
    sentences = [" ".join(speech.random_words(rng)) for _ in range(300)]
    return tiny.CORPUS + [tiny.PROMPT, ANSWER_HEAD] + [ANSWER_HEAD + s for s in sentences]


def feature_extractor():
    """The checkpoint's front end. No padding of short clips to 0.5 s
    (min_length 0): vLLM, which loads the WhisperFeatureExtractor the
    checkpoint names, does none, and the prompt would count fewer frames."""
    from transformers import Qwen3ASRFeatureExtractor

    settings = tiny.FEATURE_EXTRACTOR
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "dither")
    return Qwen3ASRFeatureExtractor(min_length=0, **{key: settings[key] for key in keys})


def build_model(config: dict, generation: dict):
    """transformers' Qwen3-ASR at the checkpoint's sizes, its audio path louder
    at initialisation (tests/speech_model.py, AUDIO_INIT_STD: at transformers'
    std 0.02 the decoder takes many hundred steps to start listening)."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    model = Qwen3ASRForConditionalGeneration(tiny.hf_config(config, generation))
    with torch.no_grad():
        audio = [*model.model.audio_tower.modules(), *model.model.multi_modal_projector.modules()]
        for module in audio:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0.0, speech.AUDIO_INIT_STD)
    return model


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def audio_tokens(frames: int) -> int:
    """Qwen3-ASR's audio tokens for a clip of this many mel frames
    (13 per chunk of 100, the rest through three stride-2 convolutions)."""
    rest = frames % CHUNK_FRAMES
    for _ in range(3):
        rest = (rest - 1) // 2 + 1
    return 13 * (frames // CHUNK_FRAMES) + rest


def prompt_ids(tokenizer, example: Example, frames: int) -> list[int]:
    """The prompt's ids with <|audio_pad|> repeated once per audio token, as
    the processor (and vLLM) expand it."""
    pad = tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    ids: list[int] = []
    for token in tokenizer(example.prompt, add_special_tokens=False).input_ids:
        ids += [pad] * audio_tokens(frames) if token == pad else [token]
    return ids


def clip_features(extractor, clip: np.ndarray):
    """One clip's log-mel frames, then zeros to whole encoder chunks: what
    vLLM and transformers' processor give the encoder for a clip alone. In a
    batch the extractor would pad the shorter clips with silence, whose frames
    are the log-mel floor, not zeros, and the last audio token reads them."""
    features = extractor(clip, sampling_rate=speech.SAMPLE_RATE, padding=True, return_tensors="pt")
    return features["input_features"][0]


def make_batch(examples: list[Example], tokenizer, extractor) -> dict[str, Any]:
    """model() inputs: each clip's own features (clip_features), zeros after
    them to the batch's longest, ids right-padded, labels on the answers alone."""
    import torch
    from torch.nn import functional

    frames = [len(example.clip) // speech.MEL_HOP for example in examples]
    features = [clip_features(extractor, example.clip) for example in examples]
    width = max(f.shape[-1] for f in features)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows, labels = [], []
    for example, count in zip(examples, frames, strict=True):
        prompt = prompt_ids(tokenizer, example, count)
        answer = tokenizer(example.answer, add_special_tokens=False).input_ids + [eos]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_features": torch.stack(
            [functional.pad(f, (0, width - f.shape[-1])) for f in features]
        ),
        "input_features_mask": torch.tensor([[1] * n + [0] * (width - n) for n in frames]),
        "input_ids": torch.tensor([row + [pad] * (length - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([row + [-100] * (length - len(row)) for row in labels]),
    }


def check_inputs(processor, examples: list[Example]) -> None:
    """The training inputs are the processor's for each clip alone (the
    reference the parity tests hold vLLM to): ids, features and frames."""
    import torch

    batch = make_batch(examples, processor.tokenizer, processor.feature_extractor)
    for row, example in enumerate(examples):
        expected = processor(
            text=example.prompt, audio=example.clip, sampling_rate=speech.SAMPLE_RATE
        )
        ids = expected["input_ids"][0]
        width = expected["input_features"].shape[-1]
        same = (
            batch["input_ids"][row, : len(ids)].tolist() == ids.tolist()
            and torch.equal(batch["input_features"][row, :, :width], expected["input_features"][0])
            and not batch["input_features"][row, :, width:].any()
            and torch.equal(
                batch["input_features_mask"][row, :width], expected["input_features_mask"][0]
            )
        )
        if not same:
            raise AssertionError(f"training inputs differ from the processor's for {example.words}")


def train(model, processor, sentences, recipe: speech.Recipe) -> list[float]:
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
        if lesson == "mix":
            # The convolutions cost most of a step (0.44 of 0.45 s at 64
            # channels); learnt on single sentences, they stay as they are.
            tower = model.model.audio_tower
            for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
                conv.requires_grad_(False)
        batches = length_sorted_batches(sentences, lesson, rng, recipe.batch_size)
        for _ in range(steps):
            batch = make_batch(next(batches), processor.tokenizer, processor.feature_extractor)
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if len(losses) % speech.LOG_EVERY == 0:
                mean = sum(losses[-speech.LOG_EVERY :]) / speech.LOG_EVERY
                elapsed = time.monotonic() - started
                step = f"step {len(losses)}/{recipe.steps} ({lesson})"
                log(f"{step}: loss {mean:.3f}, {elapsed:.0f} s")
    model.eval()
    return losses


# --------------------------------------------------------------------------
# Held-out evaluation in transformers
# --------------------------------------------------------------------------


def transcribe(model, processor, examples: list[Example]) -> list[str]:
    """Greedy answers from transformers' generate, one clip at a time (as
    vLLM computes each clip's features), as decoded text: special tokens
    dropped, <asr_text> kept (it is not one)."""
    import torch

    answers = []
    for example in examples:
        inputs = processor(
            text=example.prompt, audio=example.clip, sampling_rate=speech.SAMPLE_RATE
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new_tokens, skip_special_tokens=True))
    return answers


def evaluate(model, processor, examples: list[Example]) -> dict[str, Any]:
    answers = transcribe(model, processor, examples)
    split = [answer.rpartition(tiny.ASR_TEXT) for answer in answers]
    heads = sum(head.strip() == "language English" for head, _, _ in split)
    words = [text.strip() for _, _, text in split]
    references = [" ".join(example.words) for example in examples]
    result: dict[str, Any] = {}
    for kind in ("single", "multi"):
        pairs = [
            (r, w) for r, w, e in zip(references, words, examples, strict=True) if e.kind == kind
        ]
        kind_references, kind_words = map(list, zip(*pairs, strict=True))
        rate = speech.word_error_rate(kind_references, kind_words)
        result[kind] = {"utterances": len(pairs), "wer": round(rate, 4)}
    result["utterances"] = len(examples)
    result["wer"] = round(speech.word_error_rate(references, words), 4)
    result["answers_that_say_english"] = heads
    result["examples"] = [
        {"reference": r, "answer": a} for r, a in zip(references[:3], answers[:3], strict=True)
    ]
    return result


# --------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------


def build(directory: Path, recipe: speech.Recipe = RECIPE) -> Path:
    """Speak, train, check, evaluate and save into directory."""
    from transformers import AutoTokenizer, Qwen3ASRProcessor

    speech.check_tools()
    started = time.monotonic()
    speech.seed_everything(recipe.seed)
    directory.mkdir(parents=True, exist_ok=True)
    tiny.build_small_tokenizer(directory, tokenizer_corpus())
    tokenizer = AutoTokenizer.from_pretrained(directory)  # as inference loads it
    config, generation = tiny.write_published_configs(
        directory, tokenizer, TEXT_CONFIG, AUDIO_CONFIG
    )
    processor = Qwen3ASRProcessor(feature_extractor(), tokenizer)
    model = build_model(config, generation)

    sentences = speech.group_by_voice(speech.speak_sentences(recipe.train_sentences, recipe.seed))
    heldout = speech.speak_sentences(recipe.heldout_utterances, recipe.heldout_seed)
    spoken = time.monotonic() - started
    log(f"{recipe.train_sentences + len(heldout)} sentences spoken in {spoken:.0f} s")
    check_rng = random.Random(recipe.seed + 1)
    lessons = ("sentence", "sentence", "sentence", "mix", "mix", "mix")
    check_inputs(processor, [random_example(sentences, lesson, check_rng) for lesson in lessons])

    losses = train(model, processor, sentences, recipe)
    trained = time.monotonic() - started
    scores = evaluate(model, processor, heldout_examples(heldout, recipe))
    log(f"held-out WER {scores['wer']:.2%} on {scores['utterances']} utterances")

    tiny.save_published_weights(model.state_dict(), directory)
    (directory / "vocabulary.json").write_text(json.dumps({"words": list(speech.WORDS)}, indent=2))
    card = {
        "what": "tiny Qwen3-ASR trained on espeak-ng speech by tests/speech_model_qwen3_asr.py",
        "builder_hash": VERSION,
        "words": list(speech.WORDS),
        "speech": "tests/speech_model.py's training sentences and held-out utterances "
        f"(seeds {recipe.seed} and {recipe.heldout_seed}), one clip a prompt",
        "prompt": tiny.PROMPT,
        "answer": {
            "format": f"{ANSWER_HEAD}the words heard, lower case, then <|im_end|>",
            "forced_language": f"after a prompt ending {ANSWER_HEAD!r}: the words alone",
            "forced_share": FORCED_SHARE,
        },
        "model": {"audio_config": AUDIO_CONFIG, "text_config": TEXT_CONFIG},
        "training": {
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "optimizer": "AdamW, weight decay 0.01, grad clip 1.0",
            "learning_rate": recipe.learning_rate,
            "warmup_steps": recipe.warmup_steps,
            "lessons": [{"lesson": name, "steps": steps} for name, steps in recipe.lessons],
            "mix": "40% one sentence, 60% 2-3 sentences with pauses",
            "audio_init_std": speech.AUDIO_INIT_STD,
            "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
            "speech_seconds": round(spoken, 1),
            "train_seconds": round(trained - spoken, 1),
            "total_seconds": round(time.monotonic() - started, 1),
        },
        "heldout": {
            "engine": "transformers generate, greedy, the CLI's prompt (no forced language)",
            "metric": "jiwer WER on lower-cased words, the answer head removed",
            **scores,
        },
    }
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: speech_model_qwen3_asr.py DIR (or --cached: build into the cache only)")
    if sys.argv[1] == "--cached":
        built = cached_build()
        build_cache.remove_other_versions(built.parent, NAME, VERSION)
        log(f"checkpoint in {built}")
    else:
        install(Path(sys.argv[1]))
