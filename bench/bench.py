"""Throughput, stage times, memory and decoding benchmarks, all in ONE run,
on CPU with the tests' tiny checkpoint (same clips, greedy, same max tokens):

    PY=$(ls -d ~/.cache/run_qwen2_audio/vllm032-*/bin/python)  # made by tests/run.sh
    $PY bench/bench.py                 # every section
    $PY bench/bench.py run-batch       # only vLLM's batch runner vs this tool

Sections: run-batch, check, speech, guard, engine, stages, rss, decode. Prints
tables; docs/benchmarks.md records the numbers with machine and date.
`run-batch` runs vLLM's batch runner and this tool as whole processes, an
untimed round first, then BENCH_ROUNDS (4) rounds in alternating order, on
256 and 2,000 clips of 5 s and on compressed 5-30 s clips: medians, spreads,
every run, and requests/s between the engine being up and the batch done
(from each one's own log). `check` does it again on clips of its own and
says whether the speed-up lands in the spread docs/benchmarks.md records.
`speech` runs both on held-out speech for the speech-trained model
(tests/speech_model.py; built and cached on first use), answers of their own
length, and scores both. Run on a quiet machine: a test suite beside it
moves every number.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.update({"VLLM_USE_MODELSCOPE": "False", "VLLM_CPU_KVCACHE_SPACE": "1"})

from helpers import CPU_ENGINE_FLAGS, chirp, tone  # noqa: E402

# The engine core in the calling process (as most tests run it);
# BENCH_ENGINE_PROCESS=1 measures vLLM's default layout instead. The
# run-batch comparison always uses vLLM's default layout, as users run both.
LAYOUT = os.environ.get("BENCH_ENGINE_PROCESS", "0")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = LAYOUT
from tiny_model import build_tiny_qwen2_audio  # noqa: E402

import run_qwen2_audio as tool  # noqa: E402

CLIPS, CLIP_SECONDS, MAX_TOKENS = 64, 5, 32


def make_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"c{i:05d}.wav"
        soundfile.write(path, tone(seconds, 16000, 200 + 7 * (i % 100)), 16000)
        paths.append(path)
    return paths


def write_manifest(path: Path, clips: list[Path]) -> Path:
    path.write_text("".join(json.dumps({"id": c.stem, "audio": str(c)}) + "\n" for c in clips))
    return path


def engine_contenders(model: Path, clips: list[Path], *flags: str) -> dict[str, float]:
    """clips/s through the public API: answer_requests on all clips (batch)
    vs one llm.generate per clip (the tutorial's pattern); audio decoded first."""
    from vllm import SamplingParams

    max_num_seqs = int(flags[flags.index("--max-num-seqs") + 1]) if flags else 5
    options = tool.Options(max_tokens=MAX_TOKENS)
    prepared = [
        tool.prepare_request(tool.AudioRequest(c.stem, [str(c)]), options, None) for c in clips
    ]
    llm = tool.start_engine(
        tool.engine_kwargs(
            model=str(model),
            dtype="float32",
            gpu_memory_utilization=0.3,
            max_num_seqs=max_num_seqs,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    llm.generate(prepared[0].engine_input(0), params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    batch = list(tool.answer_requests(llm, prepared, params, options))
    batch_rate = len(clips) / (time.perf_counter() - started)
    started = time.perf_counter()
    single = [llm.generate(p.engine_input(0), params, use_tqdm=False)[0] for p in prepared]
    single_rate = len(clips) / (time.perf_counter() - started)
    assert [r["token_ids"][0] for r in batch] == [list(o.outputs[0].token_ids) for o in single]
    return {"batch": batch_rate, "tutorial": single_rate}


def engine_contenders_in_child(model: Path, clips: list[Path], *flags: str) -> dict[str, float]:
    """engine_contenders in a fresh process: one engine per process, as users run it."""
    child = subprocess.run(
        [sys.executable, __file__, "--engine-child", str(model), str(clips[0].parent), *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def transformers_loop(model: Path, clips: list[Path]) -> float:
    """The Qwen2-Audio README's loop: processor(...) + model.generate per clip."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model)
    net = Qwen2AudioForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    prompt = tool.QWEN2_AUDIO.prompt(tool.QWEN2_AUDIO.question, 1)
    started = time.perf_counter()
    for clip in clips:
        audio, _ = soundfile.read(clip, dtype="float32")
        inputs = processor(text=prompt, audio=[audio], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            net.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return len(clips) / (time.perf_counter() - started)


RUN_BATCH_CLIPS, STEADY_CLIPS, COMPRESSED_CLIPS = 256, 2000, 128
# The median speed-up at 256 x 5 s that docs/benchmarks.md records (2026-11-30);
# `check` reruns the comparison on clips of its own and says whether that
# figure lies within the rerun's spread (its rounds' lowest to highest).
RECORDED_RUN_BATCH_SPEEDUP = 1.09


def clips_in(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    return make_clips(folder, count, CLIP_SECONDS)


def run_batch_lines(model: Path, clips: list[Path], max_tokens: int = MAX_TOKENS) -> str:
    """vLLM's batch format: chat completions with file:// audio parts, the
    same system prompt and question as this tool's, greedy, same max tokens."""
    lines = []
    for clip in clips:
        user = [
            {"type": "audio_url", "audio_url": {"url": clip.as_uri()}},
            {"type": "text", "text": tool.QWEN2_AUDIO.question},
        ]
        body = {
            "model": str(model),
            "messages": [
                {"role": "system", "content": tool.QWEN2_AUDIO.system_prompt},
                {"role": "user", "content": user},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        lines.append(
            {"custom_id": clip.stem, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return "".join(json.dumps(x) + "\n" for x in lines)


@dataclasses.dataclass
class Timing:
    """One whole process, timed by the harness from its start: the exit,
    and the moments its log said the engine was up and the batch done."""

    wall: float
    engine_up: float | None = None
    done: float | None = None

    def steady_rate(self, requests: int) -> float:
        """Requests per second between the engine being up and the batch done."""
        return requests / (self.done - self.engine_up)


# vLLM's engine core says this once its model is loaded and warmed up, in
# either contender. The batch is done at run-batch's "Writing outputs" (it
# writes every result at the end, then stops its engine) and, for this tool,
# at its summary less the "engine stop" the summary reports.
ENGINE_UP = "init engine (profile, create kv cache, warmup model) took"
RUN_BATCH_DONE = "] Writing outputs to"
OUR_SUMMARY = "requests: "
OUR_ENGINE_STOP = re.compile(r"engine stop ([0-9.]+) s")
# The log lines the timings come from, whatever the caller's environment says.
LOG_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "NO_COLOR": "1",
}


def timed_process(argv: list[str]) -> Timing:
    """Whole-process wall time of a fresh process in vLLM's default layout,
    with its log lines timestamped as they arrive (vLLM logs to stdout
    unless told otherwise; this tool to stderr)."""
    env = {**os.environ, **LOG_ENV}
    env.pop("FORCE_COLOR", None)
    env.pop("VLLM_LOGGING_COLOR", None)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timing = Timing(0.0)
    tail = []
    for raw in proc.stdout:
        line, now = raw.decode(errors="replace"), time.perf_counter() - started
        if timing.engine_up is None and ENGINE_UP in line:
            timing.engine_up = now
        if RUN_BATCH_DONE in line:
            timing.done = now
        if line.startswith(OUR_SUMMARY):
            timing.done = now
        if line.startswith("stages: ") and (stop := OUR_ENGINE_STOP.search(line)):
            timing.done -= float(stop.group(1))
        tail = [*tail[-20:], line]
    proc.wait()
    timing.wall = time.perf_counter() - started
    said = "".join(tail)
    assert proc.returncode == 0, f"{argv[:4]} failed:\n{said}"
    assert timing.engine_up is not None and timing.done is not None, f"no timings in:\n{said}"
    return timing


def alternating_runs(
    argv: dict[str, list[str]], outputs: dict[str, Path], rounds: int, warm_up: bool
) -> tuple[dict[str, list[Timing]], list[list[str]]]:
    """Each contender `rounds` times, the order alternating round by round
    (the first of a pair pays what the second finds cached); with warm_up, a
    first untimed round. Returns every timing and the order of each round."""
    names = list(argv)
    runs: dict[str, list[Timing]] = {name: [] for name in names}
    orders = []
    for round_ in range(-1 if warm_up else 0, rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            outputs[name].unlink(missing_ok=True)
            timing = timed_process(argv[name])
            if round_ >= 0:
                runs[name].append(timing)
        if round_ >= 0:
            orders.append(order)
    return runs, orders


RUN_BATCH_ENGINE = [
    *CPU_ENGINE_FLAGS,
    "--max-num-seqs",
    "64",
    "--max-model-len",
    "4096",
    "--enforce-eager",
]


def run_batch_argv(model: Path, requests: Path, out: Path, media: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(requests),
        "-o",
        str(out),
        "--model",
        str(model),
        "--allowed-local-media-path",
        str(media),
        *RUN_BATCH_ENGINE,
    ]


def run_batch_answers(out: Path) -> dict[str, str]:
    answers = {}
    for line in out.read_text().splitlines():
        item = json.loads(line)
        answers[item["custom_id"]] = item["response"]["body"]["choices"][0]["message"]["content"]
    return answers


# An even number: each contender goes first in half of the rounds.
RUN_BATCH_ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))


@dataclasses.dataclass
class Comparison:
    """Both batch runners on one set of clips: every timed run, in order."""

    name: str
    requests: int
    runs: dict[str, list[Timing]]
    orders: list[list[str]]
    same_answers: int
    audio_seconds: float = 0.0
    wer: dict[str, float] = dataclasses.field(default_factory=dict)


def compare_runners(
    name: str,
    model: Path,
    clips: list[Path],
    folder: Path,
    max_tokens: int = MAX_TOKENS,
    rounds: int = RUN_BATCH_ROUNDS,
    warm_up: bool = True,
) -> Comparison:
    """`python -m vllm.entrypoints.openai.run_batch` (the `vllm run-batch`
    console script looks up the distribution "vllm", absent under vllm-cpu)
    vs this tool on the same clips (one folder), same engine flags,
    --max-num-seqs 64, vLLM's default layout, as users run both."""
    media = clips[0].parent
    requests = folder / f"{name}-requests.jsonl"
    requests.write_text(run_batch_lines(model, clips, max_tokens))
    outputs = {
        "vllm run-batch": folder / f"{name}-vllm.jsonl",
        "run_qwen2_audio": folder / f"{name}-ours.jsonl",
    }
    argv = {
        "vllm run-batch": run_batch_argv(model, requests, outputs["vllm run-batch"], media),
        "run_qwen2_audio": tool_argv(model, media, outputs["run_qwen2_audio"], max_tokens),
    }
    runs, orders = alternating_runs(argv, outputs, rounds, warm_up)
    theirs = run_batch_answers(outputs["vllm run-batch"])
    ours = tool_answers(outputs["run_qwen2_audio"])
    assert sorted(theirs) == sorted(ours) == sorted(c.stem for c in clips), "ids missing or extra"
    same = sum(theirs[k] == v for k, v in ours.items())
    seconds = sum(soundfile.info(c).duration for c in clips)
    return Comparison(name, len(clips), runs, orders, same, seconds)


def print_comparison(result: Comparison, title: str) -> None:
    """Medians, spreads and every run in its round's order; the speed-up as
    the ratio of medians and its range over the rounds."""
    print(f"\n## {title}")
    print(
        "| contender | median wall s | min-max | runs (round order) | median steady req/s "
        "(engine up to batch done) | min-max |" + (" WER |" if result.wer else "")
    )
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if result.wer else ""))
    for name, runs in result.runs.items():
        walls = [r.wall for r in runs]
        rates = [r.steady_rate(result.requests) for r in runs]
        print(
            f"| {name} | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls)} | {statistics.median(rates):.2f} | "
            f"{min(rates):.2f}-{max(rates):.2f} |"
            + (f" {result.wer[name]:.1%} |" if result.wer else "")
        )
    theirs, ours = result.runs["vllm run-batch"], result.runs["run_qwen2_audio"]
    wall = round_ratios(result)
    steady = [
        o.steady_rate(result.requests) / t.steady_rate(result.requests)
        for t, o in zip(theirs, ours, strict=True)
    ]
    median_wall = statistics.median(t.wall for t in theirs) / statistics.median(
        o.wall for o in ours
    )
    median_steady = statistics.median(
        o.steady_rate(result.requests) for o in ours
    ) / statistics.median(t.steady_rate(result.requests) for t in theirs)
    print(
        f"- whole process: run_qwen2_audio is {median_wall:.2f}x as fast (ratio of medians; "
        f"round by round {', '.join(f'{r:.2f}' for r in wall)})"
    )
    print(
        f"- steady state: {median_steady:.2f}x the requests/s (round by round "
        f"{', '.join(f'{r:.2f}' for r in steady)})"
    )
    ups = {name: statistics.median(r.engine_up for r in runs) for name, runs in result.runs.items()}
    tails = {
        name: statistics.median(r.wall - r.done for r in runs) for name, runs in result.runs.items()
    }
    print(
        "- median engine up at "
        + ", ".join(f"{n} {v:.1f} s" for n, v in ups.items())
        + "; batch done to exit "
        + ", ".join(f"{n} {v:.1f} s" for n, v in tails.items())
    )
    print(f"- order of each round: {result.orders}")
    if result.audio_seconds:
        rtfx = {
            n: result.audio_seconds / statistics.median(r.wall for r in runs)
            for n, runs in result.runs.items()
        }
        print(
            f"- {result.audio_seconds:.0f} s of audio; RTFx (audio s per wall s, median): "
            + ", ".join(f"{n} {v:.1f}" for n, v in rtfx.items())
        )
    print(f"- same answer text: {result.same_answers}/{result.requests}")


def round_ratios(result: Comparison) -> list[float]:
    """run-batch's whole-process time over this tool's, round by round."""
    pairs = zip(result.runs["vllm run-batch"], result.runs["run_qwen2_audio"], strict=True)
    return [theirs.wall / ours.wall for theirs, ours in pairs]


def make_compressed_clips(folder: Path, count: int) -> list[Path]:
    """Clips of 5-30 s, FLAC and MP3 alternately, at 16 kHz: vLLM 0.32's
    own path resamples other rates with torchaudio only, which has no build
    for torch 2.13 (vllm-cpu's), so run-batch fails every 44.1 kHz request
    here ("No package metadata was found for vllm", its hint for a missing
    module); this tool resamples itself."""
    rng = random.Random(7)
    paths = []
    for i in range(count):
        path = folder / f"z{i:05d}.{'flac' if i % 2 == 0 else 'mp3'}"
        soundfile.write(path, tone(rng.uniform(5, 30), 16000, 200 + 7 * (i % 100)), 16000)
        paths.append(path)
    return paths


def tool_argv(
    model: Path,
    audio_dir: Path,
    out: Path,
    max_tokens: int,
    *extra: str,
    script: Path = ROOT / "run_qwen2_audio.py",
) -> list[str]:
    return [
        sys.executable,
        str(script),
        "--model",
        str(model),
        "--audio-dir",
        str(audio_dir),
        "--output",
        str(out),
        "--temperature",
        "0",
        "--max-tokens",
        str(max_tokens),
        "--no-progress",
        *extra,
        *RUN_BATCH_ENGINE,
    ]


def tool_answers(out: Path) -> dict[str, str]:
    return {Path(r["id"]).stem: r["answer"] for r in map(json.loads, out.read_text().splitlines())}


SPEECH_UTTERANCES, SPEECH_ROUNDS, SPEECH_MAX_TOKENS = 256, 4, 48


def held_out_speech(folder: Path, name: str) -> tuple[Path, Path, list]:
    """The speech model (built and cached on first use), and SPEECH_UTTERANCES
    held-out utterances for it as WAV files in folder/name."""
    import hearing
    from speech_model import install

    model = install(folder / "speech-model")  # a copy of the cached build
    media = folder / name
    media.mkdir()
    speech = hearing.utterances(hearing.vocabulary(model), SPEECH_UTTERANCES, seed=4242)
    for utterance in speech:
        hearing.write_wav(media / f"{utterance.id}.wav", utterance.samples)
    return model, media, speech


def speech_comparison(folder: Path, rounds: int = SPEECH_ROUNDS) -> Comparison:
    """Both batch runners on held-out espeak-ng utterances for the speech
    model, answers of their own length, scored by WER."""
    import hearing

    model, media, speech = held_out_speech(folder, "speech")
    clips = sorted(media.glob("*.wav"))
    result = compare_runners("speech", model, clips, folder, SPEECH_MAX_TOKENS, rounds)
    answers = {
        "vllm run-batch": run_batch_answers(folder / "speech-vllm.jsonl"),
        "run_qwen2_audio": tool_answers(folder / "speech-ours.jsonl"),
    }
    references = [u.text for u in speech]
    result.wer = {
        name: hearing.word_error_rate(references, [found[u.id] for u in speech])
        for name, found in answers.items()
    }
    return result


GUARD_OFF = [
    "--compression-ratio-threshold", "none", "--logprob-threshold", "none",
    "--temperature-fallback", "none",
]  # fmt: skip


AS_ON_NPU = ROOT / "bench" / "as_on_npu.py"
GUARD_SETTINGS = ("", ", compiled as on an NPU")  # vLLM's CPU backend, then vllm-ascend's


def guard_cost(
    folder: Path, rounds: int = SPEECH_ROUNDS, settings: tuple[str, ...] = GUARD_SETTINGS
) -> None:
    """The answer guard's cost when nothing trips: the tool at its defaults
    (every answer measured, log-probabilities asked of the engine) against
    the guard turned off, on held-out speech for the speech-trained model,
    greedy, alternating rounds after an untimed one; then the same pair with
    vLLM's small compiled functions built as on an NPU (bench/as_on_npu.py:
    vllm-ascend compiles them with the "eager" backend), where vLLM's one
    inductor build per process for the rank of each sampled token, which
    the guard asks for, is not made."""
    import hearing

    model, media, speech = held_out_speech(folder, "guard")
    contenders = {"guard on": [], "guard off": GUARD_OFF}
    outputs, argv = {}, {}
    inductor = {}  # a cache of its own for each run compiled as on an NPU: it stays empty
    for suffix in settings:
        for name, flags in contenders.items():
            label = name + suffix
            outputs[label] = folder / f"{label.replace(' ', '-').replace(',', '')}.jsonl"
            if not suffix:
                argv[label] = tool_argv(model, media, outputs[label], SPEECH_MAX_TOKENS, *flags)
                continue
            inductor[label] = folder / f"inductor-{outputs[label].stem}"
            argv[label] = [
                "env",
                f"TORCHINDUCTOR_CACHE_DIR={inductor[label]}",
                *tool_argv(
                    model, media, outputs[label], SPEECH_MAX_TOKENS, *flags, script=AS_ON_NPU
                ),
            ]
    runs, orders = alternating_runs(argv, outputs, rounds, warm_up=True)
    for label, cache in inductor.items():
        built = [p for p in cache.rglob("*") if p.is_file()]
        assert not built, f"{label}: inductor built {len(built)} files, e.g. {built[:2]}"
    print(
        f"\n## guard: {SPEECH_UTTERANCES} held-out utterances, speech model, greedy, "
        f"at most {SPEECH_MAX_TOKENS} tokens, --max-num-seqs 64, vLLM's default layout"
    )
    print("| contender | median wall s | runs | median steady req/s | runs | WER | fallbacks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    references = [u.text for u in speech]
    for name, timings in runs.items():
        records = {
            Path(r["id"]).stem: r for r in map(json.loads, outputs[name].read_text().splitlines())
        }
        wer = hearing.word_error_rate(references, [records[u.id]["answer"] for u in speech])
        fallbacks = sum(r.get("fallbacks", 0) for r in records.values())
        suspect = sum("suspect" in r for r in records.values())
        walls = [t.wall for t in timings]
        rates = [t.steady_rate(SPEECH_UTTERANCES) for t in timings]
        print(
            f"| {name} | {statistics.median(walls):.1f} | {', '.join(f'{w:.1f}' for w in walls)} "
            f"| {statistics.median(rates):.2f} | {', '.join(f'{r:.2f}' for r in rates)} "
            f"| {wer:.2%} | {fallbacks} ({suspect} suspect) |"
        )
    for suffix in settings:
        on, off = runs[f"guard on{suffix}"], runs[f"guard off{suffix}"]
        steady = [a.steady_rate(1) / b.steady_rate(1) for a, b in zip(on, off, strict=True)]
        whole = [a.wall / b.wall for a, b in zip(on, off, strict=True)]
        print(
            f"- guard on over off{suffix}, round by round: steady req/s (under 1: the guard "
            f"costs) {', '.join(f'{r:.3f}' for r in steady)} (median "
            f"{statistics.median(steady):.3f}); wall s (over 1: the guard costs) "
            f"{', '.join(f'{r:.3f}' for r in whole)} (median {statistics.median(whole):.3f})"
        )
    print(f"- order of each round: {orders}")


def script_run(model: Path, manifest: Path, folder: Path, max_tokens: int) -> dict:
    """The script on a manifest; its report and the main process's peak RSS."""
    out, report = folder / f"{manifest.stem}.out.jsonl", folder / f"{manifest.stem}.report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run_qwen2_audio.py"),
            "--model",
            str(model),
            "--manifest",
            str(manifest),
            "--output",
            str(out),
            "--report",
            str(report),
            "--temperature",
            "0",
            "--max-tokens",
            str(max_tokens),
            "--no-progress",
            *CPU_ENGINE_FLAGS,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.2)
    assert proc.returncode == 0, f"script failed on {manifest}"
    return {**json.loads(report.read_text()), "peak_rss_mib": peak / 1024}


def decode_rate(paths: list[Path], threads: int) -> float:
    options = tool.Options(system_prompt="", url_timeout=10, max_audio_bytes=2**31)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: tool.load_clip(str(p), options), paths))
    return len(paths) / (time.perf_counter() - started)


SECTIONS = ("run-batch", "check", "speech", "guard", "engine", "stages", "rss", "decode")


def main(sections: list[str]) -> None:
    tool.set_environment_defaults()  # vLLM's logs to stderr: stdout is the tables
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    model = build_tiny_qwen2_audio(folder / "model")
    (folder / "clips64").mkdir()
    clips = make_clips(folder / "clips64", CLIPS, CLIP_SECONDS)
    print(f"engine core in its own process: {LAYOUT == '1'} (run-batch: always)")

    if "run-batch" in sections:
        engine = "greedy, --max-num-seqs 64, vLLM's default layout"
        result = compare_runners("rb", model, clips_in(folder / "rb", RUN_BATCH_CLIPS), folder)
        print_comparison(
            result,
            f"{RUN_BATCH_CLIPS} clips of {CLIP_SECONDS} s WAV, {MAX_TOKENS} tokens, {engine}",
        )
        steady = clips_in(folder / "steady", STEADY_CLIPS)
        result = compare_runners("steady", model, steady, folder)
        print_comparison(
            result, f"{STEADY_CLIPS} clips of {CLIP_SECONDS} s WAV, {MAX_TOKENS} tokens, {engine}"
        )
        (folder / "z").mkdir()
        compressed = make_compressed_clips(folder / "z", COMPRESSED_CLIPS)
        result = compare_runners("z", model, compressed, folder)
        print_comparison(
            result,
            f"{COMPRESSED_CLIPS} clips of 5-30 s, 16 kHz FLAC and MP3 alternately, "
            f"{MAX_TOKENS} tokens, {engine}",
        )

    if "check" in sections:
        # Its own clips: other tones, 4-6 s, another folder.
        (folder / "check").mkdir()
        own = []
        for i in range(RUN_BATCH_CLIPS):
            own.append(folder / "check" / f"k{i:05d}.wav")
            soundfile.write(own[-1], tone(4 + (i % 5) / 2, 16000, 230 + 11 * (i % 90)), 16000)
        result = compare_runners("check", model, own, folder)
        print_comparison(result, f"check: {RUN_BATCH_CLIPS} own clips of 4-6 s WAV")
        ratios = round_ratios(result)
        low, high = min(ratios), max(ratios)
        agrees = low <= RECORDED_RUN_BATCH_SPEEDUP <= high
        print(
            f"- recorded in docs/benchmarks.md: {RECORDED_RUN_BATCH_SPEEDUP:.2f}x at "
            f"{RUN_BATCH_CLIPS} x {CLIP_SECONDS} s; this check: median "
            f"{statistics.median(ratios):.2f}x, rounds {low:.2f}-{high:.2f}x: "
            + ("agrees (the recorded figure is within this spread)" if agrees else "DOES NOT AGREE")
        )

    if "speech" in sections:
        result = speech_comparison(folder)
        print_comparison(
            result,
            f"speech: {SPEECH_UTTERANCES} held-out utterances, greedy, answers of their own "
            f"length (at most {SPEECH_MAX_TOKENS} tokens), --max-num-seqs 64, vLLM's default "
            "layout",
        )

    if "guard" in sections:
        guard_cost(folder)

    if "engine" in sections:
        rates = engine_contenders_in_child(model, clips)
        # The tutorial's max_num_seqs 5 is an NPU memory limit, not a batching
        # choice: a batch user with memory to spare raises it.
        rates["batch, --max-num-seqs 64"] = engine_contenders_in_child(
            model, clips, "--max-num-seqs", "64"
        )["batch"]
        rates["transformers"] = transformers_loop(model, clips)
        print(
            f"\n## {CLIPS} clips of {CLIP_SECONDS} s, greedy, {MAX_TOKENS} tokens (tiny model, CPU)"
        )
        print("| contender | clips/s | batch is | batch, --max-num-seqs 64 is |")
        print("| --- | --- | --- | --- |")
        wide = rates["batch, --max-num-seqs 64"]
        for name in ("batch", "batch, --max-num-seqs 64", "tutorial", "transformers"):
            rate = rates[name]
            print(f"| {name} | {rate:.2f} | {rates['batch'] / rate:.2f}x | {wide / rate:.2f}x |")

    if "stages" in sections:
        run64 = script_run(model, write_manifest(folder / "m64.jsonl", clips), folder, MAX_TOKENS)
        print(f"\n## stages, script on a {CLIPS}-request manifest")
        for key in (
            "wall_seconds",
            "engine_start_seconds",
            "generate_seconds",
            "decode_seconds",
            "wait_for_audio_seconds",
            "wait_for_audio_fraction",
            "real_time_factor",
        ):
            print(f"- {key}: {run64[key]}")

    if "rss" in sections:
        (folder / "short").mkdir()
        short = make_clips(folder / "short", 5000, 0.5)
        rss = {
            n: script_run(model, write_manifest(folder / f"m{n}.jsonl", short[:n]), folder, 4)
            for n in (100, 5000)
        }
        print("\n## peak RSS of the script's main process (0.5 s clips)")
        for n, result in rss.items():
            print(f"- {n} requests: {result['peak_rss_mib']:.0f} MiB ({result['ok']} ok)")
        growth = rss[5000]["peak_rss_mib"] / rss[100]["peak_rss_mib"] - 1
        print(f"- growth 100 -> 5000: {100 * growth:+.1f}%")

    if "decode" in sections:
        (folder / "long").mkdir()
        flacs = []
        for i in range(12):
            flacs.append(folder / "long" / f"l{i}.flac")
            soundfile.write(flacs[-1], chirp(30, 44100, channels=2), 44100)
        print("\n## decode + resample, 30 s 44.1 kHz stereo FLAC")
        for threads in (1, 2):
            print(f"- {threads} thread(s): {decode_rate(flacs, threads):.1f} clips/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine-child"]:
        tool.set_environment_defaults()
        child_model, child_clips, *child_flags = sys.argv[2:]
        paths = sorted(Path(child_clips).glob("*.wav"))
        print(json.dumps(engine_contenders(Path(child_model), paths, *child_flags)))
    else:
        main(sys.argv[1:] or list(SECTIONS))
