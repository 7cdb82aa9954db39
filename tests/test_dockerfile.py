"""The Dockerfile's fixed facts, read (hadolint runs in tests/run.sh); it is
built and run with podman in test_container.py."""

from __future__ import annotations

import json
import re

from helpers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.*)$", DOCKERFILE, flags=re.M)


def test_base_image_is_a_pinned_vllm_ascend_tag():
    [arg] = [a for a in instruction("ARG") if a.startswith("BASE_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert image == "quay.io/ascend/vllm-ascend:v0.23.0"
    assert instruction("FROM") == ["${BASE_IMAGE}"]
    assert "latest" not in image


def test_script_copied_and_entrypoint_runs_it_with_tutorial_default():
    assert "COPY run_qwen2_audio.py /workspace/run_qwen2_audio.py" in DOCKERFILE
    [entrypoint] = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python3", "/workspace/run_qwen2_audio.py"]
    [cmd] = instruction("CMD")
    assert json.loads(cmd) == ["--audio-count", "2"]


def test_dockerignore_admits_only_the_script_and_requirements():
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x[:1] not in "#"]
    assert [x for x in lines if x] == ["*", "!run_qwen2_audio.py", "!requirements.txt"]


def test_readme_docker_commands_match():
    readme = (ROOT / "README.md").read_text()
    for device in ("/dev/davinci0", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"):
        assert f"--device {device}" in readme
    assert "--shm-size=1g" in readme and "-v /root/.cache:/root/.cache" in readme
    assert "--entrypoint bash" in readme and "BASE_IMAGE=" in readme
