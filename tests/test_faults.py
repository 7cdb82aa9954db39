"""Faults in a real-engine batch run: SIGKILL at random moments, SIGTERM and
SIGINT, a full disk, the engine dying. Whatever happens, the output holds
only complete JSON lines, and resuming ends with every id exactly once.

A run that a test interrupts cannot finish first: its last request's audio
comes from a HeldAudioServer, held until the test has acted (a test whose
outcome depends on which comes first is not a test)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    IN_PROCESS_ENGINE,
    ROOT,
    SCRIPT,
    HeldAudioServer,
    assert_each_id_once,
    line_count,
    start,
    tone,
    tracebacks_of_ours,
    user_env,
    wait_for_lines,
    whole_records,
)

import run_qwen2_audio as tool

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KILLS = 10
# The seed of the kill moments: drawn for each run (so that runs try other
# moments) unless RQA_FAULT_SEED gives it. The test prints it first and every
# failure names it: RQA_FAULT_SEED=n replays that run's kill delays (each
# measured from the run's start or its latest record, so where they land
# still follows the machine's speed: the checks hold wherever they land).
SEED = int(os.environ.get("RQA_FAULT_SEED") or random.SystemRandom().randrange(10**6))


def make_manifest(folder: Path, count: int, held: HeldAudioServer | None = None) -> list[str]:
    """count clips and a broken file; with held, a last request ("zz-held")
    whose audio the server holds until released."""
    lines = []
    for i in range(count):
        soundfile.write(folder / f"c{i:02d}.wav", tone(1 + i % 2, 16000, 200 + 30 * i), 16000)
        lines.append({"id": f"c{i:02d}", "audio": f"c{i:02d}.wav"})
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + b"\x00" * 64)
    lines.append({"id": "broken", "audio": "broken.wav"})
    if held is not None:
        lines.append({"id": "zz-held", "audio": held.url})
    (folder / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return [x["id"] for x in lines]


def batch_argv(
    folder: Path, model: Path, out: Path, *extra: str, chunk: int = 3, tokens: int = 8
) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(model),
        "--manifest",
        str(folder / "jobs.jsonl"),
        "--output",
        str(out),
        "--chunk-size",
        str(chunk),
        "--temperature",
        "0",
        "--max-tokens",
        str(tokens),
        "--no-progress",
        # A held download waits as long as the test needs.
        "--url-timeout",
        "3600",
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
        *extra,
    ]


def finish(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    """The same command run to its end, as a user reruns it."""
    return subprocess.run(
        argv,
        env=user_env(home, IN_PROCESS_ENGINE, argv[0]),
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )


def processes_in_session(session: int) -> list[int]:
    """Live processes of a session (the script's engine workers, say)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            alive.append(int(entry.name))
    return alive


def session_ends(session: int, within: float) -> bool:
    """True once no process of the session is left (exiting ones get a moment)."""
    deadline = time.monotonic() + within
    while processes_in_session(session):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_ten_random_sigkills_then_resume_keep_every_id_exactly_once(tiny_model, tmp_path, home):
    print(f"kill delays: RQA_FAULT_SEED={SEED} replays them")
    try:
        kill_ten_times_then_resume(tiny_model, tmp_path, home)
    except Exception as exc:  # any failure, the helpers' asserts too, names the seed
        raise AssertionError(f"RQA_FAULT_SEED={SEED} replays these kill delays: {exc}") from exc


def kill_ten_times_then_resume(tiny_model: Path, tmp_path: Path, home: Path) -> None:
    with HeldAudioServer() as held:
        ids = make_manifest(tmp_path, 64, held)
        out = tmp_path / "results.jsonl"
        argv = batch_argv(tmp_path, tiny_model, out, "--resume", chunk=2, tokens=16)
        rng = random.Random(SEED)
        for kill in range(KILLS):
            before = line_count(out)
            proc = start(argv, home)
            started = time.monotonic()
            try:
                if kill % 2 == 0:
                    # Any moment: importing, loading, the first chunks. Each
                    # kill lets a few records in at most (they land in
                    # bursts), so work is left for the kills in generation.
                    wait_for_moment(proc, out, rng.uniform(0.2, 18.0), before + 2)
                else:  # a moment inside generation: just after a record landed
                    wait_for_lines(proc, out, before + 1)
                    wait_for_moment(proc, out, rng.uniform(0.0, 0.3), before + 3)
                assert proc.poll() is None, "the run ended although its last request is held"
            finally:  # also when a wait failed: no run left behind on the machine
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            # A kill inside a write may leave a torn last line; resume drops it.
            records = [r["id"] for r in whole_records(out, torn_tail=True)]
            assert len(records) == len(set(records)), f"duplicate after kill {kill + 1}"
            print(
                f"kill {kill + 1} (seed {SEED}): at {time.monotonic() - started:.1f} s, records "
                f"{before} -> {len(records)}, torn tail: {not check_whole(out)}"
            )
        # Every kill timed after a record landed had work left: it hit a run
        # in generation (the last request is held, so none can finish).
        assert line_count(out) < len(ids) - 1, "the kills left no work for the resume"

        held.release()
        kept = whole_records(out, torn_tail=True)
        final = finish(argv, home)
    assert final.returncode in (0, 1), final.stderr.decode()[-3000:]
    records = assert_each_id_once(out, ids, kept)
    assert {r["id"] for r in records if "error" in r} == {"broken"}


def wait_for_moment(proc: subprocess.Popen, out: Path, seconds: float, lines: int) -> None:
    """Wait `seconds`, or less if the output reaches `lines` lines first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and line_count(out) < lines:
        assert proc.poll() is None, "the run ended before the moment to interrupt it"
        time.sleep(0.01)


def check_whole(out: Path) -> bool:
    return not out.exists() or out.read_bytes().endswith(b"\n") or out.stat().st_size == 0


def test_sigterm_and_sigint_stop_cleanly_and_resume(tiny_model, tmp_path, home):
    """Two held downloads: "c03-held" in the middle of the manifest stops the
    first run after the records before it, "zz-held" at the end stops the
    second; each run is signalled while it waits, so each has written
    exactly what comes before its held request, whatever the machine's speed."""
    with HeldAudioServer() as middle, HeldAudioServer() as last:
        ids = make_manifest(tmp_path, 8, last)
        with (tmp_path / "jobs.jsonl").open("a") as manifest:
            manifest.write(json.dumps({"id": "c03-held", "audio": middle.url}) + "\n")
        ids = sorted([*ids, "c03-held"])
        out = tmp_path / "results.jsonl"

        # SIGTERM to the script alone, as `kill PID` or a scheduler's stop
        # sends it, with vLLM's engine core in its own process as users run it.
        proc = start(batch_argv(tmp_path, tiny_model, out), home, layout={})
        wait_for_lines(proc, out, ids.index("c03-held"))
        proc.send_signal(signal.SIGTERM)
        stderr = stop_and_release(proc, middle)
        assert proc.returncode == 143, stderr[-3000:]
        # Our line comes after vLLM's shutdown logs; Python's multiprocessing
        # resource tracker (another process) may still warn after it at exit.
        lines = stderr.strip().splitlines()
        message = (
            "interrupted by SIGTERM: results written so far are kept; "
            f"rerun the same command with --resume to finish {out}"
        )
        assert message in lines
        assert not tracebacks_of_ours(stderr), stderr[-3000:]
        assert not any("[shutdown]" in line for line in lines[lines.index(message) :])
        assert session_ends(proc.pid, within=15), "engine processes left running"
        after_term = whole_records(out)
        assert [r["id"] for r in after_term] == ids[: ids.index("c03-held")]

        # Ctrl-C: SIGINT to the whole process group.
        proc = start(batch_argv(tmp_path, tiny_model, out, "--resume"), home)
        wait_for_lines(proc, out, len(ids) - 1)
        os.killpg(proc.pid, signal.SIGINT)
        stderr = stop_and_release(proc, last)
        assert proc.returncode == 130, stderr[-3000:]
        assert "interrupted by SIGINT" in stderr and "--resume" in stderr.strip().splitlines()[-1]
        after_int = whole_records(out)
        assert [r["id"] for r in after_int] == after_term_ids_then(after_term, ids)

        final = finish(batch_argv(tmp_path, tiny_model, out, "--resume"), home)
    # 0: the requests of this run all succeeded ("broken" sorts first and
    # already has its error record from the first run).
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    records = assert_each_id_once(out, ids, kept=after_int)  # what was written stays as it was
    assert [r["id"] for r in records if "error" in r] == ["broken"]


def after_term_ids_then(after_term: list[dict], ids: list[str]) -> list[str]:
    """The first run's ids, then every other id but the last held one."""
    done = [r["id"] for r in after_term]
    return done + [i for i in ids[:-1] if i not in done]


def stop_and_release(proc: subprocess.Popen, held: HeldAudioServer) -> str:
    """After the signal or kill: the run's stderr once it has exited, which
    it does while its download is still held (a stop never waits for a
    download); then the server answers, for the next run."""
    stderr = proc.communicate(timeout=120)[1].decode()
    held.release()
    return stderr


def test_a_signal_after_the_last_result_leaves_the_exit_code_alone(tiny_model, tmp_path, home):
    """A SIGTERM after the last record, while the run finishes (vLLM's
    shutdown, the report: a docker stop that comes late), must not turn a
    finished run into a traceback or an "interrupted": the run exits with its
    own code (1 here: "broken" failed) and notes the signal.

    The signal lands in that window every time. Not before it: it is sent
    once the last record is in the output. Not after it: --report is a named
    pipe, and the run, which writes its report after the last record and
    vLLM's shutdown and only then settles its exit code, cannot open the
    pipe before the test opens its other end, after the signal."""
    ids = make_manifest(tmp_path, 3)
    out, report = tmp_path / "results.jsonl", tmp_path / "report.fifo"
    os.mkfifo(report)
    argv = batch_argv(tmp_path, tiny_model, out, "--report", str(report))
    proc = start(argv, home, layout={})
    fifo = None  # the run's own open of the pipe blocks until this end is open
    try:
        wait_for_lines(proc, out, len(ids))
        assert proc.poll() is None, "the run ended before it wrote its report"
        proc.send_signal(signal.SIGTERM)
        fifo = os.open(report, os.O_RDONLY | os.O_NONBLOCK)  # the report can go through now
        stderr = proc.communicate(timeout=120)[1].decode()
        summary = os.read(fifo, 1 << 20)  # the report, whole in the pipe once the run ended
    finally:  # also when a wait failed: no run left behind, no descriptor open
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if fifo is not None:
            os.close(fifo)
    print(stderr.strip().splitlines()[-3:])
    assert proc.returncode == 1, stderr[-3000:]
    assert not tracebacks_of_ours(stderr) and "interrupted" not in stderr, stderr[-3000:]
    assert "note: SIGTERM arrived after every result was written" in stderr, stderr[-3000:]
    assert "the exit code is the run's (1)" in stderr
    assert json.loads(summary)["failed"] == 1
    assert_each_id_once(out, ids)


def test_the_engine_dying_mid_run_exits_70_with_one_line_and_resume_finishes(
    vllm, tiny_model, tmp_path, home
):
    """The engine core process killed (the OOM killer, a driver fault) while
    the batch runs: exit 70, not 1 (which says "the batch finished"), one
    line naming what failed and the resume command, the traceback in a file,
    the records so far whole; --resume then finishes the batch."""
    with HeldAudioServer() as held:
        ids = make_manifest(tmp_path, 4, held)
        out = tmp_path / "results.jsonl"
        argv = [vllm, *batch_argv(tmp_path, tiny_model, out)[1:]]
        proc = start(argv, home, layout={})
        wait_for_lines(proc, out, 2)
        engine_core = [pid for pid in processes_in_session(proc.pid) if pid != proc.pid]
        assert engine_core, "vLLM's engine core runs in its own process by default"
        for pid in engine_core:
            os.kill(pid, signal.SIGKILL)
        # The run may be waiting for the held audio with nothing in the
        # engine: it meets the dead engine when it next uses it. Released
        # now, the run cannot finish either way: the engine is gone.
        held.release()
        stderr = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode == 70, stderr[-3000:]
        # ("error: broken: ..." lines are the batch's own error records.)
        ours = [line for line in stderr.splitlines() if line.startswith("error: the run")]
        assert len(ours) == 1 and not tracebacks_of_ours(stderr), stderr[-3000:]
        assert ours[0].startswith("error: the run crashed (EngineDeadError")
        assert f"rerun the same command with --resume to finish {out}" in ours[0]
        traceback_file = Path(ours[0].rsplit("traceback in ", 1)[1])
        assert "Traceback" in traceback_file.read_text()
        written = whole_records(out)
        assert 2 <= len(written) < len(ids)
        assert session_ends(proc.pid, within=30), "processes left running"

        final = finish([*argv, "--resume"], home)
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert_each_id_once(out, ids, kept=written)


def test_full_disk_stops_with_a_clear_error_and_keeps_what_was_written(
    tiny_model, tmp_path, tiny_filesystem, home
):
    ids = make_manifest(tmp_path, 16)
    filler = tiny_filesystem / "filler"
    filler.write_bytes(b"\x00" * (60 * 1024))  # leaves 4 KiB: a few records
    out = tiny_filesystem / "results.jsonl"
    argv = batch_argv(tmp_path, tiny_model, out, "--resume")

    full = finish(argv, home)
    stderr = full.stderr.decode()
    assert full.returncode == 74, stderr[-3000:]
    written = whole_records(out)  # intact: no torn line at the end
    assert 0 < len(written) < len(ids)
    assert stderr.strip().splitlines()[-1] == (
        f"error: --output {out}: write failed (No space left on device); the "
        f"{len(written)} result(s) written before it are intact; free space, "
        "then rerun with --resume"
    )

    filler.unlink()
    resumed = finish(argv, home)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert_each_id_once(out, ids, kept=written)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "text"])
def test_dev_full_is_an_output_error_in_every_format(fmt):
    record = {"id": "x", "answers": ["hi"], "answer": "hi"}
    writer = tool.make_writer(fmt, tool.OutputFile(Path("/dev/full")), with_ids=False)
    with pytest.raises(tool.OutputError) as raised:
        writer.write(record)
        writer.close(complete=True)
    writer.close(complete=False)  # what the run does next: no second error
    assert str(raised.value).startswith(
        "--output /dev/full: write failed (No space left on device)"
    )
