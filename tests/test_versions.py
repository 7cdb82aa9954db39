"""What the engine runs cannot show by themselves: that each interpreter the
engine tests use really has the vLLM version it stands for, and that the
script parses on the Pythons the images run (the image has 3.12; the CPU
runs here use 3.11)."""

from __future__ import annotations

import ast
import subprocess

import pytest
from helpers import IMAGE_VLLM, SCRIPT, VLLM_PYTHONS, vllm_python

import run_qwen2_audio as tool

REPORT = "import vllm, transformers; print(vllm.__version__, transformers.__version__)"


@pytest.mark.parametrize("version", list(VLLM_PYTHONS))
def test_each_engine_interpreter_has_its_vllm(version):
    out = subprocess.run(
        [vllm_python(version), "-c", REPORT], capture_output=True, text=True, check=True
    ).stdout.split()
    expected = IMAGE_VLLM if version == "vllm-0.23" else "0.32.0"
    assert out[0] == expected, out
    print(f"{version}: vLLM {out[0]}, transformers {out[1]}")


def test_flexible_argument_parser_import():
    # 0.23 and 0.32 both have vllm.utils.argparse_utils; older vLLM had
    # vllm.utils, which the script falls back to.
    assert tool.import_flexible_argument_parser().__name__ == "FlexibleArgumentParser"


@pytest.mark.parametrize("minor", [10, 11, 12])
def test_script_parses_as_python_3_minor(minor):
    ast.parse(SCRIPT.read_text(), feature_version=(3, minor))
