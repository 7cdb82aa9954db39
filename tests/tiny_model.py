"""A tiny Qwen2-Audio checkpoint with the real architecture and random weights.

No model can be downloaded in CI, and the real one is 16 GB; this one loads in
vLLM as Qwen2AudioForConditionalGeneration and in transformers alike, so both
engines can be compared token for token. Two vocabularies:
- real (about 160 MB, nearly all of it embeddings): the real Qwen2 vocabulary
  and Qwen2-Audio's added tokens at their published ids (tests/published.py),
  so prompts are counted as the real model counts them. Its tokenizer loads in
  about a second, and vLLM loads it about twelve times per run (processors in
  three processes): some 25 s per engine start on this machine;
- small (about 2.5 MB): a 400-token byte-level BPE trained on a few sentences,
  with the same added tokens first. The tests that do not count or compare
  prompts run on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import published

# Qwen2-Audio's added tokens; the speech model's own small tokenizer
# (tests/speech_model.py) uses them too.
SPECIAL_TOKENS = list(published.ADDED_TOKENS)

# What the small vocabulary is trained on: the prompts the tests send.
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
SMALL_VOCAB_ROWS = 512  # > the trained vocabulary; text never produces the extra rows

WEIGHT_STD = 0.2
PROJECTOR_STD = 1.0


def build_real_tokenizer(directory: Path):
    """Qwen2-Audio-7B-Instruct's tokenizer: the real Qwen2 vocabulary and the
    tokenizer_config.json of tests/fixtures/published (its chat template)."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    published.write_tokenizer(directory)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        source = published.FIXTURES / published.INSTRUCT / name
        if source.exists():
            shutil.copy(source, directory / name)
    return AutoTokenizer.from_pretrained(directory)


def build_small_tokenizer(directory: Path):
    """A byte-level BPE of CORPUS with the added tokens at ids 0-5 and the
    published chat template."""
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
        chat_template=published.published_tokenizer_config(published.INSTRUCT)["chat_template"],
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_qwen2_audio(directory: Path, real_vocabulary: bool = False) -> Path:
    """Write config, tokenizer, processor and random weights into directory."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    if real_vocabulary:
        tokenizer = build_real_tokenizer(directory)
        vocab_size = published.VOCAB_SIZE  # the published embedding rows
        first_unused_logit = published.FIRST_ADDED_ID
    else:
        tokenizer = build_small_tokenizer(directory)
        vocab_size = SMALL_VOCAB_ROWS
        first_unused_logit = len(tokenizer)
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
        # Silence the logits of the added tokens and of the rows no token
        # uses: random weights would otherwise pick <|im_end|> first now and
        # then and end an answer after one token, which would make the
        # token-for-token comparison trivial.
        model.lm_head.weight[first_unused_logit:] = 0.0
        if not real_vocabulary:
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


if __name__ == "__main__":
    import sys

    print(
        build_tiny_qwen2_audio(Path(sys.argv[1]), real_vocabulary="--real-vocabulary" in sys.argv)
    )
