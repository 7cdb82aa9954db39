"""Throughput, stage times, memory and decoding benchmarks, all in ONE run,
on CPU with the tests' tiny checkpoint (same clips, greedy, same max tokens):

    .venv-test/bin/python bench/bench.py   # after `bash tests/run.sh` made the venv

Prints a table; BENCHMARKS.md records the numbers with machine and date.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.update({"VLLM_USE_MODELSCOPE": "False", "VLLM_CPU_KVCACHE_SPACE": "1"})

from conftest import CPU_ENGINE_FLAGS, chirp, tone  # noqa: E402

# conftest puts vLLM's engine core into the calling process (as the tests
# run it); BENCH_ENGINE_PROCESS=1 measures vLLM's default layout instead.
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
    """clips/s: one generate for all (batch) vs one generate per clip (tutorial)."""
    args = tool.build_parser().parse_args(
        [
            "--model",
            str(model),
            "--temperature",
            "0",
            "--max-tokens",
            str(MAX_TOKENS),
            *CPU_ENGINE_FLAGS,
            *flags,
        ]
    )
    options = tool.options_from_args(args)
    count = tool.load_tokenizer_counter(str(model), False)
    prepared = [
        tool.prepare_request(tool.AudioRequest(c.stem, [str(c)]), options, count) for c in clips
    ]
    llm = tool.start_engine(tool.engine_kwargs(max_clips=1, **tool.engine_flags(args)))
    params = tool.build_sampling_params(args)
    llm.generate(prepared[0].engine_inputs(), params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    batch = list(tool.generate_chunk(llm, prepared, params))
    batch_rate = len(clips) / (time.perf_counter() - started)
    started = time.perf_counter()
    single = [r for p in prepared for r in tool.generate_chunk(llm, [p], params)]
    single_rate = len(clips) / (time.perf_counter() - started)
    assert [r["token_ids"] for r in batch] == [r["token_ids"] for r in single]
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


def main() -> None:
    tool.set_environment_defaults()  # vLLM's logs to stderr: stdout is the table
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    model = build_tiny_qwen2_audio(folder / "model")
    (folder / "clips64").mkdir()
    clips = make_clips(folder / "clips64", CLIPS, CLIP_SECONDS)
    rates = engine_contenders_in_child(model, clips)
    # The tutorial's max_num_seqs 5 is an NPU memory limit, not a batching
    # choice: a batch user with memory to spare raises it.
    rates["batch, --max-num-seqs 64"] = engine_contenders_in_child(
        model, clips, "--max-num-seqs", "64"
    )["batch"]
    rates["transformers"] = transformers_loop(model, clips)

    run64 = script_run(model, write_manifest(folder / "m64.jsonl", clips), folder, MAX_TOKENS)
    (folder / "short").mkdir()
    short = make_clips(folder / "short", 5000, 0.5)
    rss = {
        n: script_run(model, write_manifest(folder / f"m{n}.jsonl", short[:n]), folder, 4)
        for n in (100, 5000)
    }
    (folder / "long").mkdir()
    flacs = []
    for i in range(12):
        flacs.append(folder / "long" / f"l{i}.flac")
        soundfile.write(flacs[-1], chirp(30, 44100, channels=2), 44100)
    decode = {t: decode_rate(flacs, t) for t in (1, 2)}

    print(f"\n## {CLIPS} clips of {CLIP_SECONDS} s, greedy, {MAX_TOKENS} tokens (tiny model, CPU)")
    print(f"engine core in its own process: {LAYOUT == '1'}")
    print("| contender | clips/s | batch is | batch, --max-num-seqs 64 is |")
    print("| --- | --- | --- | --- |")
    wide = rates["batch, --max-num-seqs 64"]
    for name in ("batch", "batch, --max-num-seqs 64", "tutorial", "transformers"):
        rate = rates[name]
        print(f"| {name} | {rate:.2f} | {rates['batch'] / rate:.2f}x | {wide / rate:.2f}x |")
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
    print("\n## peak RSS of the script's main process (0.5 s clips)")
    for n, result in rss.items():
        print(f"- {n} requests: {result['peak_rss_mib']:.0f} MiB ({result['ok']} ok)")
    growth = rss[5000]["peak_rss_mib"] / rss[100]["peak_rss_mib"] - 1
    print(f"- growth 100 -> 5000: {100 * growth:+.1f}%")
    print("\n## decode + resample, 30 s 44.1 kHz stereo FLAC")
    for threads, rate in decode.items():
        print(f"- {threads} thread(s): {rate:.1f} clips/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine-child"]:
        tool.set_environment_defaults()
        child_model, child_clips, *child_flags = sys.argv[2:]
        paths = sorted(Path(child_clips).glob("*.wav"))
        print(json.dumps(engine_contenders(Path(child_model), paths, *child_flags)))
    else:
        main()
