"""Every vLLM API the script touches exists in vLLM 0.23.0 (what the
vllm-ascend v0.23.0 image runs) and in the installed vLLM (0.32 on CPU),
checked from their source; and the script parses as Python 3.10."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import SCRIPT

import run_qwen2_audio as tool

IMAGE_VLLM = "0.23.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "run_qwen2_audio"

# file -> class -> names that must be a field, method or method parameter.
USED = {
    "vllm/engine/arg_utils.py": {
        "EngineArgs": [
            *tool.ENGINE_DEFAULTS,
            "limit_mm_per_prompt",
            "trust_remote_code",
            "dtype",
            "gpu_memory_utilization",
            "tensor_parallel_size",
            "add_cli_args",
            "from_cli_args",
        ]
    },
    "vllm/sampling_params.py": {
        "SamplingParams": [
            "n",
            "temperature",
            "top_p",
            "top_k",
            "max_tokens",
            "repetition_penalty",
            "seed",
        ]
    },
    "vllm/entrypoints/llm.py": {"LLM": ["generate", "sampling_params", "use_tqdm"]},
    "vllm/outputs.py": {
        "RequestOutput": ["prompt_token_ids", "outputs"],
        "CompletionOutput": ["text", "token_ids", "finish_reason"],
    },
    "vllm/assets/audio.py": {"AudioAsset": ["name", "get_local_path"]},
    "vllm/utils/argparse_utils.py": {"FlexibleArgumentParser": ["parse_args"]},
}
ENV_VARS = ["VLLM_LOGGING_STREAM", "VLLM_USE_MODELSCOPE", "VLLM_ASSETS_CACHE"]
TOP_LEVEL = ["LLM", "EngineArgs", "SamplingParams"]


def names_in_class(node: ast.ClassDef) -> set[str]:
    names = set()
    for item in ast.walk(node):
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.FunctionDef):
            names.add(item.name)
            names.update(a.arg for a in item.args.args + item.args.kwonlyargs)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names


def missing_api(source_root: Path) -> list[str]:
    missing = []
    for file, classes in USED.items():
        tree = ast.parse((source_root / file).read_text())
        found = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for cls, names in classes.items():
            if cls not in found:
                missing.append(f"{file}: class {cls}")
                continue
            have = names_in_class(found[cls])
            missing += [f"{cls}.{n}" for n in names if n not in have]
    init = (source_root / "vllm/__init__.py").read_text()
    missing += [f"vllm.{n}" for n in TOP_LEVEL if f'"{n}"' not in init and f" {n}" not in init]
    envs = (source_root / "vllm/envs.py").read_text()
    missing += [f"envs.{n}" for n in ENV_VARS if f'"{n}"' not in envs]
    return missing


@pytest.fixture(scope="module")
def image_vllm_source() -> Path:
    """vLLM 0.23.0's Python source from its wheel: downloaded once, not installed."""
    target = CACHE / f"vllm-{IMAGE_VLLM}-src"
    if not (target / "vllm/__init__.py").exists():
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        if not list(wheels.glob(f"vllm-{IMAGE_VLLM}-*.whl")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    f"vllm=={IMAGE_VLLM}",
                    "-d",
                    str(wheels),
                ],
                check=True,
            )
        [wheel] = wheels.glob(f"vllm-{IMAGE_VLLM}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".py")]
            archive.extractall(target, members)
    return target


def test_script_uses_only_apis_present_in_vllm_0_23(image_vllm_source):
    assert missing_api(image_vllm_source) == []


def test_script_uses_only_apis_present_in_installed_vllm():
    import vllm

    assert missing_api(Path(vllm.__file__).parent.parent) == []


def test_checker_notices_a_missing_api(image_vllm_source, monkeypatch):
    monkeypatch.setitem(USED, "vllm/sampling_params.py", {"SamplingParams": ["no_such_kw"]})
    assert missing_api(image_vllm_source) == ["SamplingParams.no_such_kw"]


def test_flexible_argument_parser_import_works_on_both():
    # 0.23 and 0.32 both have vllm.utils.argparse_utils; older vLLM had
    # vllm.utils, which the script falls back to.
    assert tool.import_flexible_argument_parser().__name__ == "FlexibleArgumentParser"


@pytest.mark.parametrize("minor", [10, 11, 12])
def test_script_parses_as_python_3_minor(minor):
    ast.parse(SCRIPT.read_text(), feature_version=(3, minor))
