"""MindRLHF / MindFormers-0.x Pangu-alpha checkpoints -> our parameter names (``model.init:
pangualpha:<file.ckpt>``).

Their names are MindFormers' cell paths (``mindformers/models/pangualpha/pangualpha.py`` with
``mindformers/modules/transformer/transformer.py``): ``backbone.embedding.word_embedding`` /
``position_embedding`` / ``backbone.top_query_embedding`` (``.embedding_table``), blocks
``backbone.blocks.N.`` and ``backbone.top_query_layer.`` holding ``layernorm1`` / ``layernorm2``
(``.gamma`` / ``.beta``), ``attention.dense1`` / ``dense2`` / ``dense3`` (q, k, v) and
``attention.projection``, ``output.mapping`` / ``output.projection`` (``.weight`` / ``.bias``), and
``backbone.layernorm``. MindRLHF saved the same model one level down (``model.backbone...``, beside
its value heads), so the prefix before ``backbone.`` is found, not assumed; names outside it
(value heads, optimizer moments) are not the model's and are left out.

Layout: dense1/2/3 are MindFormers ``Linear(transpose_b=True)``, stored (out, in) like ours;
``attention.projection`` and the MLP's ``mapping`` / ``projection`` are ``transpose_b=False``,
stored (in, out), and are transposed here. The checkpoint does not record the number of heads.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .safetensors_io import CheckpointError

WORD = "backbone.embedding.word_embedding.embedding_table"
TOP = "backbone.top_query_layer."
GLOBAL = {  # theirs (after the prefix) -> ours
    WORD: "model.embed_tokens",
    "backbone.embedding.position_embedding.embedding_table": "model.embed_positions",
    "backbone.top_query_embedding.embedding_table": "model.top_query_layer.query_embed",
    "backbone.layernorm.gamma": "model.norm.weight",
    "backbone.layernorm.beta": "model.norm.bias",
}
BLOCK = {  # theirs (under a block) -> (ours, stored (in, out): transpose)
    "layernorm1.gamma": ("attn_norm.weight", False),
    "layernorm1.beta": ("attn_norm.bias", False),
    "layernorm2.gamma": ("mlp_norm.weight", False),
    "layernorm2.beta": ("mlp_norm.bias", False),
    "attention.dense1.weight": ("attn.q_proj.weight", False),
    "attention.dense1.bias": ("attn.q_proj.bias", False),
    "attention.dense2.weight": ("attn.k_proj.weight", False),
    "attention.dense2.bias": ("attn.k_proj.bias", False),
    "attention.dense3.weight": ("attn.v_proj.weight", False),
    "attention.dense3.bias": ("attn.v_proj.bias", False),
    "attention.projection.weight": ("attn.o_proj.weight", True),
    "attention.projection.bias": ("attn.o_proj.bias", False),
    "output.mapping.weight": ("mlp.up_proj.weight", True),
    "output.mapping.bias": ("mlp.up_proj.bias", False),
    "output.projection.weight": ("mlp.down_proj.weight", True),
    "output.projection.bias": ("mlp.down_proj.bias", False),
}
CACHE_STATE = ("key_past", "value_past")  # use_past's KV cache buffers: state, not weights
BLOCK_RE = re.compile(r"backbone\.blocks\.(\d+)\.")


def model_prefix(names, source: str) -> str:
    """What stands before ``backbone.`` in the model's names: '' for MindFormers, ``model.`` for
    a MindRLHF policy; the shortest one, so an optimizer's copy (``adam_m.model...``) is not it."""
    found = sorted((n[: -len(WORD)] for n in names if n.endswith(WORD)), key=len)
    if not found:
        raise CheckpointError(
            f"{source}: no parameter named {WORD!r}: not a MindFormers / MindRLHF Pangu-alpha "
            "checkpoint"
        )
    return found[0]


def config_of(shapes: dict[str, tuple], n_heads: int | None, source: str) -> ModelConfig:
    """Our model config from the checkpoint's names and shapes (prefix stripped) and the number of
    heads, which a checkpoint does not record."""
    if not n_heads:
        raise ValueError(
            f"model.n_heads: {source} does not record its number of attention heads; set it in "
            "the model section (Pangu-alpha 2.6B has 32, 13B has 40)"
        )
    try:
        vocab, d = shapes[WORD]
        positions = shapes["backbone.embedding.position_embedding.embedding_table"][0]
        d_ff = shapes[TOP + "output.mapping.weight"][1]
    except KeyError as e:
        raise CheckpointError(f"{source}: parameter {e.args[0]} is missing") from None
    blocks = {int(m.group(1)) for n in shapes if (m := BLOCK_RE.match(n))}
    cfg = ModelConfig(
        family="pangualpha",
        vocab_size=vocab,
        d_model=d,
        n_layers=len(blocks) + 1,
        n_heads=n_heads,
        d_ff=d_ff,
        max_seq_len=positions,
        tie_embeddings=True,
        arch="pangualpha",
    )
    cfg.validate("model.")
    return cfg


def from_mindformers(
    tensors: dict[str, np.ndarray], n_heads: int | None, source: str
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Their tensors -> (our config, our tensors). Every parameter of the model must be there and
    nothing else under ``backbone.``; either kind of mismatch is an error naming the parameter."""
    prefix = model_prefix(tensors, source)
    theirs = {
        k[len(prefix) :]: np.asarray(v)
        for k, v in tensors.items()
        if k.startswith(prefix + "backbone.") and not k.endswith(CACHE_STATE)
    }
    cfg = config_of({k: v.shape for k, v in theirs.items()}, n_heads, source)
    wanted = {t: (o, False) for t, o in GLOBAL.items()}
    blocks = [f"backbone.blocks.{i}." for i in range(cfg.n_layers - 1)]
    for at, ours_at in zip(
        [*blocks, TOP],
        [*(f"model.layers.{i}." for i in range(len(blocks))), "model.top_query_layer."],
    ):
        wanted.update({at + t: (ours_at + o, tr) for t, (o, tr) in BLOCK.items()})
    missing = sorted(set(wanted) - set(theirs))
    unexpected = sorted(set(theirs) - set(wanted))
    if missing or unexpected:
        name = prefix + (missing or unexpected)[0]
        raise CheckpointError(
            f"{source}: parameter {name} is {'missing' if missing else 'unexpected'} for a "
            f"Pangu-alpha of {cfg.n_layers} layers (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    ours = {}
    for t, (o, transpose) in wanted.items():
        v = theirs[t].astype(np.float32)
        ours[o] = np.ascontiguousarray(v.T) if transpose else v
    return cfg, ours


def read_ckpt(path: str | Path, names_only: bool = False) -> dict:
    """A MindSpore checkpoint's parameters as arrays (``mindspore.load_checkpoint``). With
    ``names_only``, ``{name: shape}`` of the few parameters the config is read from plus every
    name (as shape ``()``), without building the rest."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    names: list[str] = []

    def keep(name: str) -> bool:
        names.append(name)
        return (
            not names_only
            or name.endswith((WORD, "position_embedding.embedding_table"))
            or (name.endswith(TOP + "output.mapping.weight"))
        )

    try:
        params = ms.load_checkpoint(str(path), choice_func=keep)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({e})") from None
    if names_only:
        return {n: tuple(params[n].shape) if n in params else () for n in names}
    return {n: p.asnumpy() for n, p in params.items()}


def pangualpha_config(path: str | Path, n_heads: int | None) -> ModelConfig:
    """The model config of a checkpoint file (the large tensors are not read)."""
    shapes = read_ckpt(path, names_only=True)
    prefix = model_prefix(shapes, str(path))
    return config_of(
        {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}, n_heads, str(path)
    )


def import_pangualpha(
    path: str | Path, n_heads: int | None
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    return from_mindformers(read_ckpt(path), n_heads, str(path))
