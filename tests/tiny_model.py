"""A tiny Qwen2-Audio checkpoint with the real architecture and random weights.

No model can be downloaded in CI, and the real one is 16 GB; this one is about
1 MB and loads in vLLM as Qwen2AudioForConditionalGeneration and in
transformers alike, so both engines can be compared token for token.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
]

CORPUS = [
    "You are a helpful assistant.",
    "What is recited in the audio?",
    "What sport and what nursery rhyme are referenced?",
    "What is said in the audio? Describe the audio in detail.",
    "Mary had a little lamb, its fleece was white as snow.",
    "And the winning call: it's a home run, the crowd goes wild!",
    "system user assistant Audio 1: 2: 3: 4: 5:",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


WEIGHT_STD = 0.2
PROJECTOR_STD = 1.0


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_qwen2_audio(directory: Path) -> Path:
    """Write config, tokenizer, processor and random weights into directory."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    vocab_size = 512  # > trained vocab; the extra rows are never produced by text
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,  # the Whisper front end's size, fixed
            "max_source_positions": 1500,  # the encoder always sees 3000 frames
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,  # head_dim 64: CPU attention supports it
            "max_position_embeddings": 4096,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:  # matrices; norms keep their 1s and 0s
                parameter.normal_(0.0, WEIGHT_STD)
        # Loud audio embeddings, so that the answer depends on the audio from
        # the first token on: a wrong audio path in vLLM then shows at once.
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.normal_(0.0, PROJECTOR_STD)
        # Silence the special tokens' logits: random weights would otherwise
        # often pick <|im_end|> first and end every answer after one token,
        # which would make the token-for-token comparison trivial.
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_published_weights(model, directory)
    extractor = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
    )
    Qwen2AudioProcessor(extractor, tokenizer).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen2_audio(Path(sys.argv[1])))


def save_published_weights(model, directory: Path) -> None:
    """model.safetensors in the published checkpoint's layout (vLLM rejects
    transformers 5's language_model.model.model.* names; transformers loads either)."""
    from safetensors.torch import save_file

    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("model.")
        if name.startswith("language_model."):
            name = "language_model.model." + name.removeprefix("language_model.")
        if name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        state[name] = tensor.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
