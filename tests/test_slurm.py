"""The README's Slurm job array, run as written on a real single-node Slurm
started by the test: two shards answer every id exactly once, and a task
that fails shows it in its log, exit code and results, and costs the other
shard nothing; a cancelled array, submitted again, completes with no id
twice and no torn line. The daemons are stopped by PID afterwards."""

from __future__ import annotations

import json
import re
import shutil
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
    tone,
    user_env,
)
from slurm import LocalSlurm

import run_qwen2_audio as tool

# One cluster, on one test worker: its two array tasks already fill two cores.
pytestmark = [pytest.mark.engine, pytest.mark.xdist_group("slurm")]


def readme_block(after: str, index: int = 0) -> str:
    """The index-th ```bash block after the given README text."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(after) :]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[index]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's folder: the script, the README's sbatch file, their audio."""
    shutil.copy(SCRIPT, tmp_path / "run_qwen2_audio.py")
    (tmp_path / "run_qwen2_audio.sbatch").write_text(readme_block("For Slurm, save"))
    (tmp_path / "audio").mkdir()
    for i in range(4):
        soundfile.write(tmp_path / "audio" / f"{i}.wav", tone(1 + i, 16000, 300 + 50 * i), 16000)
    return tmp_path


def write_manifest(project: Path, count: int, extra_lines: str = "") -> list[str]:
    ids = [f"utt-{i:03d}" for i in range(count)]
    lines = [json.dumps({"id": i, "audio": f"audio/{n % 4}.wav"}) for n, i in enumerate(ids)]
    (project / "jobs.jsonl").write_text("\n".join(lines) + "\n" + extra_lines)
    return ids


def submit(slurm: LocalSlurm, project: Path, home: Path, tiny_model: Path, *flags: str) -> str:
    """`sbatch --array=0-1 run_qwen2_audio.sbatch jobs.jsonl out/ FLAGS` from
    the user's folder, with the machine's differences on the command line:
    one CPU per task (two cores here) and the tiny model on the CPU engine."""
    env = user_env(home, {**IN_PROCESS_ENGINE, **slurm.env()})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's python3
    command = [
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        "--array=0-1",
        "run_qwen2_audio.sbatch",
        "jobs.jsonl",
        "out",
        "--model",
        str(tiny_model),
        "--temperature",
        "0",
        *flags,
        *CPU_ENGINE_FLAGS,
        *ASK_ONCE,
    ]
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def shard_records(project: Path) -> dict[int, list[dict]]:
    """Each task's results; every line must be whole JSON."""
    shards = {}
    for task in (0, 1):
        path = project / "out" / f"results.{task}.jsonl"
        text = path.read_text() if path.exists() else ""
        assert text == "" or text.endswith("\n"), f"torn last line in {path}"
        shards[task] = [json.loads(line) for line in text.splitlines()]
    return shards


def task_log(project: Path, job: str, task: int) -> str:
    return (project / f"qwen2-audio.{job}_{task}.log").read_text()


def test_cancelled_array_submitted_again_completes(slurm, project, home, tiny_model):
    ids = write_manifest(project, 12)
    # Each shard's last request is held by a local server until the test
    # releases it, after the cancel: both tasks are mid-run when the signal
    # comes, however fast or loaded the machine.
    held_ids = [
        next(f"zz-held-{n}" for n in range(99) if tool.in_shard(f"zz-held-{n}", t, 2))
        for t in (0, 1)
    ]
    with HeldAudioServer() as held:
        with (project / "jobs.jsonl").open("a") as manifest:
            for held_id in held_ids:
                manifest.write(json.dumps({"id": held_id, "audio": held.url}) + "\n")
        ids = sorted([*ids, *held_ids])
        flags = ["--max-tokens", "4", "--url-timeout", "3600"]
        job = submit(slurm, project, home, tiny_model, *flags)
        # Cancel as a preemption does, once both tasks are writing results
        # (the deadline only ends a hang: the held requests keep both running).
        deadline = time.monotonic() + 1800
        while not all(shard_records(project).values()):
            assert time.monotonic() < deadline and slurm.jobs(job), "the tasks never wrote"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=slurm.env(), check=True)
        slurm.wait_for_job(job)
        held.release()
    partial = shard_records(project)
    for task in (0, 1):  # exec: the signal reached the script, not just the shell
        assert "interrupted by SIGTERM" in task_log(project, job, task)
        assert held_ids[task] not in [r["id"] for r in partial[task]]

    again = submit(slurm, project, home, tiny_model, *flags)
    slurm.wait_for_job(again)
    shards = []
    for task in (0, 1):  # each shard's ids exactly once, its earlier lines kept
        path = project / "out" / f"results.{task}.jsonl"
        shard = [i for i in ids if tool.in_shard(i, task, 2)]
        shards += [r["id"] for r in assert_each_id_once(path, shard, kept=partial[task])]
    assert sorted(shards) == ids, "every id in one shard or the other"


def test_two_shards_answer_every_id_once_and_a_failing_task_costs_the_other_nothing(
    slurm, project, home, tiny_model
):
    """One array over a manifest with a line whose clip is missing: every id
    is answered in exactly one shard, the task that held the bad line shows
    it in its log, exit code and results, and the other shard completes."""
    ids = write_manifest(project, 12, extra_lines='{"id": "broken", "audio": "audio/nope.wav"}\n')
    job = submit(slurm, project, home, tiny_model, "--max-tokens", "4")
    slurm.wait_for_job(job)

    shards = shard_records(project)
    got = [r["id"] for records in shards.values() for r in records]
    assert sorted(got) == sorted([*ids, "broken"]), "every id once, none in two shards"
    assert all(shards.values()), "both shards had work"
    [failing] = [t for t in (0, 1) if any(r["id"] == "broken" for r in shards[t])]
    other = 1 - failing
    [broken] = [r for records in shards.values() for r in records if "error" in r]
    assert broken["id"] == "broken" and "no such file" in broken["error"]["message"]
    log = task_log(project, job, failing)
    assert "error: broken: audio" in log
    assert f"requests: {len(shards[failing]) - 1} ok, 1 failed" in log
    assert f"requests: {len(shards[other])} ok, 0 failed" in task_log(project, job, other)
    assert slurm.finished(job) == {failing: ("FAILED", "1:0"), other: ("COMPLETED", "0:0")}
    merge = readme_block("When every task has ended")
    subprocess.run(["bash", "-c", merge], cwd=project, check=True)
    merged = [json.loads(line)["id"] for line in (project / "results.jsonl").open()]
    assert sorted(merged) == sorted([*ids, "broken"])
