"""transformers' own Qwen2-Audio implementation: the oracle for vLLM's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def transformers_greedy_ids(
    model_dir: Path, prompt: str, clips: list[np.ndarray], max_new_tokens: int
) -> tuple[int, list[int]]:
    """(prompt token count, greedy output ids) for one prompt in float32."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    inputs = processor(text=prompt, audio=clips, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[1]
    return prompt_tokens, generated[0, prompt_tokens:].tolist()
