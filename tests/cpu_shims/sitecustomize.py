"""What vLLM's Qwen3-ASR needs to run on a CPU-only test machine, applied at
interpreter start (this directory on PYTHONPATH; the engine's spawned
processes inherit it). Each fix acts only where its problem exists.

1. No torchvision: transformers' Qwen2-VL image-processing module imports
   torchvision on its first lines, yet vLLM's Qwen3-ASR imports it
   (qwen3_asr -> qwen2_5_omni_thinker [-> qwen3_omni_moe_thinker on 0.23]
   -> qwen2_5_vl -> qwen2_vl) for smart_resize alone. That module name is then
   served by transformers' own PIL twin (image_processing_pil_qwen2_vl, the
   same smart_resize), the fallback transformers itself picks for the class
   names when torchvision is missing.
2. vLLM 0.23's async_tensor_h2d pins host memory by default on any Linux
   (PIN_MEMORY = "microsoft" not in uname), and its Qwen3-ASR audio encoder
   calls it for cu_seqlens: with no CUDA device torch refuses ("Found no NVIDIA
   driver", or "pin_memory=True requires a CUDA or other accelerator backend").
   Where torch has no CUDA device the default becomes False.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys

_QWEN2_VL_IMAGES = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_QWEN2_VL_IMAGES_PIL = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
_TORCH_UTILS = "vllm.utils.torch_utils"


class _TwinLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return importlib.import_module(_QWEN2_VL_IMAGES_PIL)

    def exec_module(self, module):
        pass


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


def _no_pinning(module):
    import torch

    function = getattr(module, "async_tensor_h2d", None)
    if torch.cuda.is_available() or function is None or not function.__defaults__:
        return
    parameters = inspect.signature(function).parameters
    if "pin_memory" not in parameters:  # vLLM 0.32: asks the platform itself
        return
    defaults = [p for p in parameters.values() if p.default is not inspect.Parameter.empty]
    function.__defaults__ = tuple(False if p.name == "pin_memory" else p.default for p in defaults)
    module.PIN_MEMORY = False


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == _QWEN2_VL_IMAGES and importlib.util.find_spec("torchvision") is None:
            return importlib.machinery.ModuleSpec(name, _TwinLoader())
        if name == _TORCH_UTILS:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _no_pinning)
            return spec
        return None


sys.meta_path.insert(0, _Finder())
