"""LoRA: low-rank adapters on a decoder's projections (Hu et al. 2021, arXiv:2106.09685).

A target projection ``y = W x + b`` becomes ``y = W x + b + (alpha / r) B A dropout(x)``, A (r, in)
initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(in)), B (out, r) zero, so the wrapped
model starts as the base. W and b stay frozen; only A and B (and a head the stage names, e.g. the
reward model's ``score``) train. What the stages use:

* :func:`wrap` -- the model to train: a new cell tree over the *same* Parameter objects as the
  base (no copy of the weights) whose target projections carry adapters. The base model object
  is left as it was: :func:`base_of` gives it back as the reference model, adapters off.
* :func:`saved_state` / :func:`load_saved_state` -- what a checkpoint of a model holds: the trained
  tensors only (adapters and named heads) for a wrapped model, everything otherwise.
* :func:`checkpoint_meta` -- the manifest's ``lora`` entry: the settings and the id of the base
  checkpoint the adapters apply to (also a parent of the artifact: lineage kept).
* :func:`read_weights` -- the full weights of any checkpoint artifact: an adapter checkpoint's base
  read the same way (adapters may stack: SFT adapters on an import, PPO adapters on those) and the
  adapters merged in by :func:`merge`, ``W + (alpha / r) B A``, in NumPy.
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..config import LORA_TARGETS, LoraConfig
from .decoder import Linear, ScalarHeadModel, load_state_dict, state_dict

A, B = ".lora_a", ".lora_b"


class LoraLinear(nn.Cell):
    """``linear`` (its weight and bias: the same Parameters, frozen) plus a trainable low-rank
    update. Parameter names stay the base's (``<path>.weight``) beside ``<path>.lora_a`` and
    ``<path>.lora_b``, as PEFT names ``lora_A`` / ``lora_B``."""

    def __init__(self, linear: Linear, rank: int, scale: float, dropout: float, rng):
        super().__init__()
        d_out, d_in = linear.weight.shape
        self.weight = linear.weight
        self.bias = linear.bias
        self.mm = linear.mm  # its shard strategy (parallel.py) comes with it
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), PEFT's init of A
        self.lora_a = Parameter(Tensor(rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32)))
        self.lora_b = Parameter(Tensor(np.zeros((d_out, rank), np.float32)))
        self.lora_mm = ops.MatMul(transpose_b=True)
        self.scale = float(scale)
        self.dropout = float(dropout)

    def construct(self, x, w=None):
        """``w``: as Linear's, but always None here: layer graphs are refused with LoRA (config
        check_layer_graphs), so the weights are read from ``self``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = self.mm(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        h = x2
        if self.dropout > 0 and self.training:
            h = ops.dropout(h, p=self.dropout)
        y = y + self.lora_mm(self.lora_mm(h, self.lora_a), self.lora_b) * self.scale
        return y.reshape(*lead, -1)


_CELL_KEYS: set[str] = set()


def _rebuild(cell: nn.Cell, path: str, swap) -> nn.Cell:
    """A new cell of ``cell``'s class holding the same Parameters, primitives, tensors and plain
    attributes, its children rebuilt the same way, except where ``swap(path, child)`` gives a
    replacement. No constructor runs, so nothing is allocated; names come out as the base's."""
    new = swap(path, cell)
    if new is not None:
        return new
    if not _CELL_KEYS:
        _CELL_KEYS.update(nn.Cell().__dict__)  # MindSpore's own bookkeeping of a cell
    cls = type(cell)
    new = cls.__new__(cls)
    nn.Cell.__init__(new, auto_prefix=cell._auto_prefix)
    for k, v in cell.__dict__.items():
        # compiled graphs stay the base's
        if k not in _CELL_KEYS and not k.endswith("_graphs") and not k.startswith("_lora_"):
            setattr(new, k, v)
    for k, p in cell._params.items():
        setattr(new, k, p)
    for k, child in cell._cells.items():
        setattr(new, k, _rebuild(child, f"{path}.{k}" if path else k, swap))
    new.set_train(cell.training)
    return new


def wrap(
    model: nn.Cell, lora: LoraConfig | None, seed: int, base: str | None, train: tuple = ()
) -> nn.Cell:
    """``model`` with adapters on the ``lora.targets`` projections of every layer (``model``
    itself when ``lora`` is None). ``base``: the id of the checkpoint ``model`` holds, which the
    adapter checkpoints name as their base; ``train``: prefixes of further parameters that train
    (a new head). Everything else is frozen (``requires_grad`` off, so ``trainable_params()`` is
    the adapters and those)."""
    if lora is None:
        return model
    if not base:
        raise ValueError(
            "model.lora: adapters train on a stored base checkpoint; this stage has none (the "
            "sft stage needs the input 'init': set model.init)"
        )
    suffixes = tuple("." + LORA_TARGETS[t] for t in lora.targets)
    rng = np.random.default_rng([seed, 0x10A])

    def swap(path, cell):
        if (
            isinstance(cell, Linear)
            and path.startswith(("model.layers.", "model.top_query_layer."))
            and path.endswith(suffixes)
        ):
            return LoraLinear(cell, lora.rank, lora.scale, lora.dropout, rng)
        return None

    new = _rebuild(model, "", swap)
    trained = []
    for name, p in new.parameters_and_names():
        p.requires_grad = name.endswith((A, B)) or name.startswith(tuple(train))
        if p.requires_grad:
            trained.append(name)
    if not any(n.endswith(A) for n in trained):
        raise ValueError(f"model.lora.targets {lora.targets}: no projection of the model matched")
    model.set_train(False)
    info = {
        "base": base,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": list(lora.targets),
        # an adapter checkpoint of a reward model keeps only the base's transformer
        "base_prefix": "model." if isinstance(model, ScalarHeadModel) else "",
    }
    # plain attributes (object.__setattr__): the base must not become a sub-cell of its wrapper
    object.__setattr__(new, "_lora_base", model)
    object.__setattr__(new, "_lora_info", info)
    object.__setattr__(new, "_lora_trained", tuple(trained))
    return new


def is_wrapped(model) -> bool:
    return "_lora_info" in getattr(model, "__dict__", {})


def base_of(model) -> nn.Cell | None:
    """The frozen base a wrapped model shares its weights with (the reference model: the same
    weights, adapters off); None for a model that is not wrapped."""
    return model.__dict__["_lora_base"] if is_wrapped(model) else None


def saved_state(model) -> dict[str, np.ndarray]:
    """What a checkpoint of ``model`` holds: the trained tensors of a wrapped model, else all."""
    if not is_wrapped(model):
        return state_dict(model)
    params = dict(model.parameters_and_names())
    return {n: params[n].asnumpy() for n in model.__dict__["_lora_trained"]}


def load_saved_state(model, tensors: dict[str, np.ndarray], source: str) -> None:
    """Inverse of :func:`saved_state`: exactly those tensors, by name and shape."""
    if not is_wrapped(model):
        load_state_dict(model, tensors, source=source)
        return
    want = set(model.__dict__["_lora_trained"])
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise KeyError(f"{source}: adapters missing {missing[:5]}, unexpected {unexpected[:5]}")
    load_state_dict(model, tensors, strict=False, source=source)


def checkpoint_meta(model) -> dict:
    """The manifest entry of a checkpoint written from ``saved_state(model)``: ``{"lora": ...}``
    for a wrapped model (its settings and its base's id), ``{}`` otherwise."""
    return {"lora": dict(model.__dict__["_lora_info"])} if is_wrapped(model) else {}


def merge(
    base: dict[str, np.ndarray], adapters: dict[str, np.ndarray], info: dict, source: str
) -> dict[str, np.ndarray]:
    """Full weights from a base's and an adapter checkpoint's tensors: each adapted weight
    ``W + (alpha / rank) B A`` (float64, stored float32), other adapter-checkpoint tensors (a
    trained head) as they are, base tensors outside ``base_prefix`` dropped."""
    scale = float(info["alpha"]) / int(info["rank"])
    out = {k: v for k, v in base.items() if k.startswith(info.get("base_prefix", ""))}
    for k, v in adapters.items():
        if k.endswith(B):
            if k[: -len(B)] + A not in adapters:
                raise ValueError(f"{source}: {k} has no {k[: -len(B)] + A}")
            continue
        if not k.endswith(A):
            out[k] = v
            continue
        w, b = k[: -len(A)] + ".weight", k[: -len(A)] + B
        if w not in out or b not in adapters:
            raise ValueError(f"{source}: {k} needs {w} in the base and {b} beside it")
        delta = adapters[b].astype(np.float64) @ v.astype(np.float64)
        if delta.shape != out[w].shape:
            raise ValueError(f"{source}: {b} @ {k} is {delta.shape}, {w} is {out[w].shape}")
        out[w] = (out[w].astype(np.float64) + scale * delta).astype(np.float32)
    return out


def read_weights(store, ref: str) -> dict[str, np.ndarray]:
    """The full weights of checkpoint ``ref``: its tensors, or for an adapter checkpoint its base's
    full weights (read the same way) with its adapters merged in."""
    art = store.get(ref, verify=False)
    tensors = store.read_checkpoint(art.id)  # verified
    info = art.meta.get("lora")
    if not info:
        return tensors
    base = read_weights(store, info["base"])
    return merge(base, tensors, info, f"adapter checkpoint {art.id[:12]} ({art.name})")
