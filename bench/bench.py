"""Throughput, stage times, memory and decoding benchmarks, all in ONE run,
on CPU with the tests' tiny checkpoint (same clips, greedy, same max tokens):

    PY=$(ls -d ~/.cache/run_qwen2_audio/vllm032-*/bin/python)  # made by tests/run.sh
    $PY bench/bench.py                 # every section
    $PY bench/bench.py run-batch       # only vLLM's batch runner vs this tool

Sections: run-batch, speech, engine, stages, rss, decode. Prints tables;
BENCHMARKS.md records the numbers with machine and date. `speech` runs both
batch runners on held-out speech for the speech-trained model
(tests/speech_model.py; built and cached on first use), answers of their own
length, several alternating rounds, and scores both.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    prompt = tool.build_prompt(tool.DEFAULT_QUESTION, 1, tool.DEFAULT_SYSTEM_PROMPT)
    started = time.perf_counter()
    for clip in clips:
        audio, _ = soundfile.read(clip, dtype="float32")
        inputs = processor(text=prompt, audio=[audio], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            net.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return len(clips) / (time.perf_counter() - started)


RUN_BATCH_CLIPS = 256


def run_batch_lines(model: Path, clips: list[Path], max_tokens: int = MAX_TOKENS) -> str:
    """vLLM's batch format: chat completions with file:// audio parts, the
    same system prompt and question as this tool's, greedy, same max tokens."""
    lines = []
    for clip in clips:
        user = [
            {"type": "audio_url", "audio_url": {"url": clip.as_uri()}},
            {"type": "text", "text": tool.DEFAULT_QUESTION},
        ]
        body = {
            "model": str(model),
            "messages": [
                {"role": "system", "content": tool.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        lines.append(
            {"custom_id": clip.stem, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return "".join(json.dumps(x) + "\n" for x in lines)


def timed_process(argv: list[str]) -> float:
    """Whole-process wall time of a fresh process in vLLM's default layout."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


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


def run_batch_comparison(model: Path, folder: Path) -> dict[str, Any]:
    """`python -m vllm.entrypoints.openai.run_batch` (the `vllm run-batch`
    console script looks up the distribution "vllm", absent under vllm-cpu)
    vs this tool on the same clips, same engine flags, --max-num-seqs 64."""
    (folder / "rb").mkdir()
    clips = make_clips(folder / "rb", RUN_BATCH_CLIPS, CLIP_SECONDS)
    requests = folder / "rb-requests.jsonl"
    requests.write_text(run_batch_lines(model, clips))
    vllm_out, ours_out, report = (
        folder / "rb-vllm.jsonl",
        folder / "rb-ours.jsonl",
        folder / "rb.json",
    )
    times = {
        "vllm run-batch": timed_process(run_batch_argv(model, requests, vllm_out, folder / "rb")),
        "run_qwen2_audio": timed_process(
            tool_argv(model, folder / "rb", ours_out, MAX_TOKENS, "--report", str(report))
        ),
    }
    theirs = run_batch_answers(vllm_out)
    ours = tool_answers(ours_out)
    same = sum(theirs.get(k) == v for k, v in ours.items())
    return {"seconds": times, "same_answers": same, "stages": json.loads(report.read_text())}


def tool_argv(model: Path, audio_dir: Path, out: Path, max_tokens: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run_qwen2_audio.py"),
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


def speech_comparison(folder: Path, rounds: int = SPEECH_ROUNDS) -> dict[str, Any]:
    """Both batch runners on held-out espeak-ng utterances for the speech
    model: a first untimed run of each (caches), then `rounds` timed runs of
    each, the order alternating round by round; answers scored by WER."""
    import hearing
    from speech_model import install

    model = install(folder / "speech-model")
    media = folder / "speech"
    media.mkdir()
    speech = hearing.utterances(hearing.vocabulary(model), SPEECH_UTTERANCES, seed=4242)
    for utterance in speech:
        hearing.write_wav(media / f"{utterance.id}.wav", utterance.samples)
    clips = sorted(media.glob("*.wav"))
    requests = folder / "speech-requests.jsonl"
    requests.write_text(run_batch_lines(model, clips, SPEECH_MAX_TOKENS))
    outputs = {
        "vllm run-batch": folder / "speech-vllm.jsonl",
        "run_qwen2_audio": folder / "s.jsonl",
    }
    argv = {
        "vllm run-batch": run_batch_argv(model, requests, outputs["vllm run-batch"], media),
        "run_qwen2_audio": tool_argv(model, media, outputs["run_qwen2_audio"], SPEECH_MAX_TOKENS),
    }
    names = list(argv)
    runs: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    for round_ in range(rounds + 1):
        order = names if round_ % 2 == 0 else names[::-1]
        orders.append(order)
        for name in order:
            outputs[name].unlink(missing_ok=True)
            seconds = timed_process(argv[name])
            if round_:  # round 0 warms the caches and is not counted
                runs[name].append(seconds)
    answers = {
        "vllm run-batch": run_batch_answers(outputs["vllm run-batch"]),
        "run_qwen2_audio": tool_answers(outputs["run_qwen2_audio"]),
    }
    for name, found in answers.items():
        assert sorted(found) == sorted(u.id for u in speech), f"{name}: ids missing or extra"
    references = [u.text for u in speech]
    wer = {
        name: hearing.word_error_rate(references, [found[u.id] for u in speech])
        for name, found in answers.items()
    }
    audio_seconds = sum(len(u.samples) for u in speech) / hearing.RATE
    return {"runs": runs, "orders": orders[1:], "wer": wer, "audio_seconds": audio_seconds}


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


SECTIONS = ("run-batch", "speech", "engine", "stages", "rss", "decode")


def main(sections: list[str]) -> None:
    tool.set_environment_defaults()  # vLLM's logs to stderr: stdout is the tables
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    model = build_tiny_qwen2_audio(folder / "model")
    (folder / "clips64").mkdir()
    clips = make_clips(folder / "clips64", CLIPS, CLIP_SECONDS)
    print(f"engine core in its own process: {LAYOUT == '1'} (run-batch: always)")

    if "run-batch" in sections:
        result = run_batch_comparison(model, folder)
        seconds = result["seconds"]
        ratio = seconds["vllm run-batch"] / seconds["run_qwen2_audio"]
        print(
            f"\n## {RUN_BATCH_CLIPS} clips of {CLIP_SECONDS} s, greedy, {MAX_TOKENS} tokens, "
            "--max-num-seqs 64"
        )
        print("| contender | whole-process wall s |")
        print("| --- | --- |")
        for name, value in seconds.items():
            print(f"| {name} | {value:.1f} |")
        print(f"- run_qwen2_audio is {ratio:.2f}x as fast (target 1.05x)")
        print(f"- same answer text: {result['same_answers']}/{RUN_BATCH_CLIPS}")
        stages = result["stages"]
        print(
            f"- our stages: engine start {stages['engine_start_seconds']:.1f} s, generation "
            f"{stages['generate_seconds']:.1f} s, wall inside run() "
            f"{stages['wall_seconds']:.1f} s, "
            f"engine waiting for audio {stages['wait_for_audio_seconds']:.2f} s"
        )

    if "speech" in sections:
        result = speech_comparison(folder)
        print(
            f"\n## speech: {SPEECH_UTTERANCES} held-out utterances "
            f"({result['audio_seconds']:.0f} s of audio), greedy, answers of their own length "
            f"(at most {SPEECH_MAX_TOKENS} tokens), --max-num-seqs 64, vLLM's default layout"
        )
        print("| contender | median wall s | min-max | runs in order | RTFx | WER |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, runs in result["runs"].items():
            median = statistics.median(runs)
            print(
                f"| {name} | {median:.1f} | {min(runs):.1f}-{max(runs):.1f} | "
                f"{', '.join(f'{r:.1f}' for r in runs)} | {result['audio_seconds'] / median:.1f} | "
                f"{result['wer'][name]:.1%} |"
            )
        medians = {name: statistics.median(runs) for name, runs in result["runs"].items()}
        ratio = medians["vllm run-batch"] / medians["run_qwen2_audio"]
        print(f"- run_qwen2_audio is {ratio:.2f}x as fast (median whole-process wall time)")
        print(f"- order of each timed round: {result['orders']}")

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
