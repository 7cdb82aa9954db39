"""A tiny Qwen3-ASR checkpoint with the real architecture and random weights.

No model can be downloaded in CI, and the real one is several GB; this one (2.2
MB) is laid out as the published Qwen/Qwen3-ASR-1.7B is, so vLLM loads it as
Qwen3ASRForConditionalGeneration and its greedy ids can be compared with
transformers' token for token:
- config.json: model_type "qwen3_asr" with a thinker_config holding the
  audio_config and the text_config, every key written out (vLLM's and
  transformers' defaults differ, n_window_infer for one);
- model.safetensors: thinker.audio_tower.* (the projector is its proj1 and
  proj2), thinker.model.*, thinker.lm_head.weight;
- a Qwen2 byte-level BPE of about 400 tokens trained on a few sentences, with
  Qwen3-ASR's control tokens as added special tokens and <asr_text> as an added
  token that is not special (decoding without special tokens keeps it);
- preprocessor_config.json: the Whisper feature extractor (128 mel bins) under
  processor_class Qwen3ASRProcessor, as published; vLLM 0.23 accepts no other.

transformers (5.19 and later) knows only the converted "-hf" layout (top-level
audio_config and text_config, model.audio_tower.*, model.language_model.*), and
from that layout vLLM 0.23 silently builds its default model (its config reads
thinker_config alone: a 32-layer, 4096-wide text model and a 32-layer encoder
with n_window 100). So the checkpoint keeps the original layout and
transformers_greedy_ids converts config and weights in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The prompt vLLM's own Qwen3-ASR transcription path builds (get_generation_prompt),
# without a system turn; LANGUAGE_PREFIX after it forces the language.
PROMPT = (
    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n"
)
LANGUAGE_PREFIX = "language English<asr_text>"

# Qwen3-ASR's control tokens, at ids 0-5 of the small vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
]
# Separates "language English" from the transcript in the model's answer. Not
# special: skip_special_tokens must keep it, as the published tokenizer does.
ASR_TEXT = "<asr_text>"

# What the small vocabulary is trained on: the prompts, and answers of the
# form the real model gives.
CORPUS = [
    "system user assistant",
    "language English language Chinese language None",
    "Mary had a little lamb, its fleece was white as snow.",
    "And the winning call: it's a home run, the crowd goes wild!",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "What is said in the audio? Transcribe the audio.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]
VOCAB_SIZE = 400  # the trained vocabulary, added tokens included
VOCAB_ROWS = 512  # embedding rows: more than the tokenizer has

# The languages the published config.json lists (support_languages).
LANGUAGES = [
    "Chinese",
    "English",
    "Cantonese",
    "Arabic",
    "German",
    "French",
    "Spanish",
    "Portuguese",
    "Indonesian",
    "Italian",
    "Korean",
    "Russian",
    "Thai",
    "Vietnamese",
    "Japanese",
    "Turkish",
    "Hindi",
    "Malay",
    "Dutch",
    "Swedish",
    "Danish",
    "Finnish",
    "Polish",
    "Czech",
    "Filipino",
    "Persian",
    "Greek",
    "Romanian",
    "Hungarian",
    "Macedonian",
]

HIDDEN = 128
# The audio encoder: every key, as Qwen3-ASR-1.7B writes them, with tiny sizes.
# n_window 50 (chunks of 100 mel frames, 13 audio tokens each) and
# n_window_infer 800 (attention windows of 8 chunks) are the published values;
# vLLM's defaults are 100 and 400, transformers' 50 and 800.
AUDIO_CONFIG = {
    "model_type": "qwen3_asr_audio_encoder",
    "num_mel_bins": 128,  # the Whisper front end's size, fixed
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "downsample_hidden_size": 32,
    "output_dim": HIDDEN,  # the text model's hidden size
    "max_source_positions": 1500,
    "n_window": 50,
    "n_window_infer": 800,
    "conv_chunksize": 500,
    "activation_function": "gelu",
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "scale_embedding": False,
    "initializer_range": 0.02,
}
# The text model (Qwen3): head_dim 64, which vLLM's CPU attention supports.
# M-RoPE as Qwen3-ASR configs carry it (sections [24, 20, 20] at head_dim 128,
# halved here; interleaved). vLLM gives audio and text tokens the same position
# on all three axes, so it equals the plain RoPE of transformers' "-hf" model.
TEXT_CONFIG = {
    "model_type": "qwen3_asr_text",
    "vocab_size": VOCAB_ROWS,
    "hidden_size": HIDDEN,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {
        "rope_type": "default",
        "mrope_section": [12, 10, 10],
        "interleaved": True,
        "mrope_interleaved": True,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "initializer_range": 0.02,
}
# The audio_config keys transformers' Qwen3ASREncoderConfig knows.
HF_AUDIO_KEYS = (
    "num_mel_bins",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "downsample_hidden_size",
    "output_dim",
    "n_window",
    "n_window_infer",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "scale_embedding",
    "initializer_range",
)
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "processor_class": "Qwen3ASRProcessor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": True,
}

SEED = 0
WEIGHT_STD = 0.2  # as tests/tiny_model.py
PROJECTOR_STD = 1.0  # loud audio embeddings, as tests/tiny_model.py's
# Qwen3 normalizes each head's queries and keys (q_norm, k_norm): with their
# weights at 1 its attention is nearly flat and the answer repeats one token
# whatever the audio. At 3 the answer varies and follows the audio: another
# noise seed, 0.1 s less of a 40 s clip or n_window_infer 400 instead of 800
# each change the 16 greedy ids.
QK_NORM_WEIGHT = 3.0
# Weight-name prefixes: the "-hf" model transformers builds -> the published checkpoint.
HF_TO_PUBLISHED = (
    ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("model.language_model.", "thinker.model."),
    ("lm_head.", "thinker.lm_head."),
)


def build_small_tokenizer(directory: Path, corpus: list[str] = CORPUS):
    """Qwen2's tokenizer pipeline (its split regex, byte-level BPE, NFC) trained
    on corpus, the control tokens at ids 0-5 and <asr_text> next; saved with
    the audio token names Qwen3ASRProcessor reads from the tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    pipeline = Qwen2Tokenizer()  # an empty Qwen2 tokenizer: its normalizer and pre-tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = pipeline.backend_tokenizer.normalizer
    tokenizer.pre_tokenizer = pipeline.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,  # <asr_text> comes after
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus * 4, trainer)
    vocab = tokenizer.get_vocab()
    merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    fast = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        audio_token="<|audio_pad|>",
        audio_bos_token="<|audio_start|>",
        audio_eos_token="<|audio_end|>",
    )
    fast.add_tokens([AddedToken(ASR_TEXT, special=False, normalized=False)])
    fast.save_pretrained(directory)
    return fast


def build_tiny_qwen3_asr(directory: Path) -> Path:
    """Write config, generation config, tokenizer, feature extractor and random
    weights (fixed seed) into directory, in the published checkpoint's layout."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_small_tokenizer(directory)
    config, generation = write_published_configs(directory, tokenizer, TEXT_CONFIG)

    torch.manual_seed(SEED)
    model = Qwen3ASRForConditionalGeneration(hf_config(config, generation)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:  # matrices and kernels; norms keep their 1s and 0s
                parameter.normal_(0.0, WEIGHT_STD)
        for name, parameter in model.named_parameters():
            if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                parameter.fill_(QK_NORM_WEIGHT)
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.normal_(0.0, PROJECTOR_STD)
        # Silence the logits of the added tokens and of the rows no token uses:
        # random weights would otherwise pick <|im_end|> now and then and end
        # an answer after one token, which would make the comparison trivial.
        model.lm_head.weight[len(tokenizer) :] = 0.0
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(ASR_TEXT)] = 0.0
    save_published_weights(model.state_dict(), directory)
    return directory


def write_published_configs(
    directory: Path, tokenizer, text_config: dict, audio_config: dict = AUDIO_CONFIG
) -> tuple[dict, dict]:
    """config.json (the published layout, thinker_config), generation_config.json
    and preprocessor_config.json; returns the config and generation settings."""
    from transformers import GenerationConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": LANGUAGES,
        "thinker_config": {
            "model_type": "qwen3_asr_thinker",
            "audio_config": audio_config,
            "text_config": text_config,
            "audio_token_id": ids["<|audio_pad|>"],
            "audio_start_token_id": ids["<|audio_start|>"],
            "audio_end_token_id": ids["<|audio_end|>"],
            "user_token_id": tokenizer.convert_tokens_to_ids("user"),
            "initializer_range": 0.02,
            "dtype": "float32",
        },
        "dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    GenerationConfig(**generation).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(FEATURE_EXTRACTOR, indent=2) + "\n"
    )
    return config, generation


def hf_config(config: dict, generation: dict):
    """transformers' "-hf" Qwen3ASRConfig for a checkpoint's config.json and
    generation_config.json."""
    from transformers import Qwen3ASRConfig

    thinker = config["thinker_config"]
    audio = {key: thinker["audio_config"][key] for key in HF_AUDIO_KEYS}
    text = {
        key: value
        for key, value in thinker["text_config"].items()
        if key not in ("model_type", "rope_theta", "rope_scaling")
    }
    # Plain RoPE: see TEXT_CONFIG.
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": thinker["text_config"]["rope_theta"],
    }
    return Qwen3ASRConfig(
        audio_config={"model_type": "qwen3_asr_encoder", **audio},
        text_config={"model_type": "qwen3", **text},
        audio_token_id=thinker["audio_token_id"],
        tie_word_embeddings=thinker["text_config"]["tie_word_embeddings"],
        pad_token_id=generation["pad_token_id"],
        eos_token_id=generation["eos_token_id"],
    )


def save_published_weights(state: dict, directory: Path) -> None:
    """model.safetensors under the published checkpoint's names."""
    from safetensors.torch import save_file

    published = {}
    for name, tensor in state.items():
        for old, new in HF_TO_PUBLISHED:
            if name.startswith(old):
                published[new + name.removeprefix(old)] = tensor.detach().contiguous()
                break
        else:
            raise ValueError(f"no published name for {name}")
    save_file(published, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_hf_model(directory: Path):
    """transformers' Qwen3ASRForConditionalGeneration (float32) with the
    checkpoint's weights, renamed back to the "-hf" layout."""
    from safetensors.torch import load_file
    from transformers import Qwen3ASRForConditionalGeneration

    config = hf_config(
        json.loads((directory / "config.json").read_text()),
        json.loads((directory / "generation_config.json").read_text()),
    )
    model = Qwen3ASRForConditionalGeneration(config).float().eval()
    state = {}
    for name, tensor in load_file(str(directory / "model.safetensors")).items():
        for old, new in HF_TO_PUBLISHED:
            if name.startswith(new):
                state[old + name.removeprefix(new)] = tensor
                break
        else:
            raise ValueError(f"unexpected weight {name}")
    model.load_state_dict(state, strict=True)
    return model


def transformers_greedy_ids(
    directory: Path, samples: np.ndarray, prompt: str, max_new_tokens: int
) -> list[int]:
    """transformers' greedy answer ids for 16 kHz mono float32 samples and the
    same prompt text vLLM gets: the reference vLLM's ids must equal.

    Features come from transformers' own Qwen3ASRFeatureExtractor built from the
    checkpoint's preprocessor_config.json (the Whisper front end with the mel
    axis padded to whole encoder chunks, which its encoder needs; the
    WhisperFeatureExtractor the checkpoint names gives the same frames), and
    the prompt's <|audio_pad|> is expanded by Qwen3ASRProcessor, not by a chat
    template (that would add a system turn vLLM's prompt does not have).

    vLLM's ids equal these for clips of 0.5 s or more whose length is a whole
    number of 10 ms (160 samples). Shorter clips transformers pads to 0.5 s
    (as the original Qwen3-ASR library does) and vLLM does not; vLLM 0.23 pads
    every clip to whole 10 ms first, which adds a mel frame to the others.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRProcessor,
    )

    settings = json.loads((directory / "preprocessor_config.json").read_text())
    extractor = Qwen3ASRFeatureExtractor(
        feature_size=settings["feature_size"],
        sampling_rate=settings["sampling_rate"],
        hop_length=settings["hop_length"],
        chunk_length=settings["chunk_length"],
        n_fft=settings["n_fft"],
        padding_value=settings["padding_value"],
        dither=settings["dither"],
    )
    processor = Qwen3ASRProcessor(extractor, AutoTokenizer.from_pretrained(directory))
    # The processor pads the mel axis for n_window 50 (its default, the published value).
    inputs = processor(
        text=prompt,
        audio=np.asarray(samples, dtype=np.float32),
        sampling_rate=settings["sampling_rate"],
    )
    generation = GenerationConfig.from_pretrained(directory)
    generation.update(max_new_tokens=max_new_tokens, do_sample=False)
    model = load_hf_model(directory)
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=generation)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen3_asr(Path(sys.argv[1])))
