"""The tool, with vLLM's backend for its small compiled functions set as
vllm-ascend sets it on an NPU. Usage: python bench/as_on_npu.py ARGS (the
tool's own arguments).

vLLM compiles a few small functions with `current_platform.simple_compile_backend`
(among them the kernel that ranks each sampled token among the
log-probabilities, which the answer guard asks for): "inductor" on the CPU
stand-in, which builds C++ once per process, and "eager" in vllm-ascend's
NPUPlatform (0.23.0, vllm_ascend/platform.py: `simple_compile_backend: str =
"eager"  # Disable torch.compile()`). A CPU benchmark run through this file
pays for those functions what an NPU run pays. vLLM's CPU platform spawns its
engine core, and that its worker, where the sampler runs; each imports this
file again as `__mp_main__`, so the setting is made there too, before vLLM's
sampler is imported. bench/bench.py checks that nothing was built by inductor.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_qwen2_audio as tool  # noqa: E402

SAMPLER_OPS = "vllm.v1.sample.ops.logprobs"  # reads the backend when imported


def compile_as_on_npu() -> None:
    from vllm.platforms import current_platform

    # Imported already, its kernel would keep the backend it was decorated with.
    assert SAMPLER_OPS not in sys.modules, f"{SAMPLER_OPS} imported before the setting"
    type(current_platform).simple_compile_backend = "eager"


def main() -> int:
    argv = sys.argv[1:]
    try:
        # The tool's environment first: it must be in place before vLLM is imported.
        tool.set_environment_defaults(tool.early_arguments(argv).model)
    except tool.ExplainedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return tool.EXIT_BAD_INPUT
    compile_as_on_npu()
    return tool.main(argv)


if __name__ == "__main__":
    tool.exit_now(main())
elif __name__ == "__mp_main__":  # vLLM's engine core or worker, with the parent's environment
    compile_as_on_npu()
