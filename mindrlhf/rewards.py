"""Reward functions behind one signature, the one TRL's reward functions have:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

``columns`` are the prompt dataset's other columns, by name (a prompt file's ``answer``, say), one
value per completion. A reward is named in the config (``grpo.reward``, ``ppo.gold_reward``,
``online_dpo.judge``) as

    python:<file.py>:<function>     a function in the user's file (its bytes are in the cache key)
    python:<module>:<function>      a function in an importable module
    <recipe>                        a built-in recipe's reward (arithmetic, gsm_symbolic, ...)
    [spec, spec, ...]               several, summed with ``reward_weights`` (default 1 each)

(``rm``, the trained reward model, is handled by the stages themselves.) What a function returns
is checked: one finite number per completion, else :class:`RewardError` naming the function and
the row, which stops the stage with the last good checkpoint kept.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a reward; names it and the row."""


@dataclass
class Term:
    name: str  # what errors call it
    fn: object
    weight: float = 1.0


def _load_python(spec: str):
    target, _, fn_name = spec[len("python:") :].rpartition(":")
    if not target or not fn_name:
        raise RewardError(f"{spec!r}: expected python:<file.py or module>:<function>")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"{spec!r}: no such file {path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        mod_name = f"mindrlhf_user_reward_{path.stem}_{digest}"
        if mod_name not in sys.modules:
            loader = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader)
            try:
                loader.loader.exec_module(mod)
            except SyntaxError as e:
                raise RewardError(
                    f"{path}:{e.lineno}: syntax error in the reward file: {e.msg}"
                ) from None
            except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import
                raise RewardError(
                    f"{path}: importing the reward file raised {type(e).__name__}: {e}"
                ) from None
            sys.modules[mod_name] = mod
        mod = sys.modules[mod_name]
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"{spec!r}: cannot import module {target!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(f"{spec!r}: {target} has no function {fn_name!r}")
    return fn


def _load_recipe(name: str):
    from .data.recipes import load_recipe

    try:
        recipe = load_recipe(name)
    except FileNotFoundError:
        raise RewardError(
            f"{name!r}: neither 'rm', python:<file>:<function> nor a recipe"
        ) from None
    if not hasattr(recipe, "reward"):
        raise RewardError(f"recipe {name!r} has no reward function")

    def fn(prompts, completions, **columns):
        return recipe.reward(prompts, completions, columns)

    return fn


def load(spec, weights: list[float] | None = None) -> "Reward":
    specs = spec if isinstance(spec, list) else [spec]
    weights = list(weights or [1.0] * len(specs))
    if len(weights) != len(specs):
        raise RewardError(f"{len(specs)} reward functions but {len(weights)} reward_weights")
    terms = []
    for s, w in zip(specs, weights):
        fn = _load_python(s) if s.startswith("python:") else _load_recipe(s)
        terms.append(Term(s.rpartition(":")[2] if s.startswith("python:") else s, fn, float(w)))
    return Reward(terms)


@dataclass
class Reward:
    terms: list[Term]

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict | None = None
    ) -> np.ndarray:
        n = len(completions)
        cols = {
            k: v
            for k, v in (columns or {}).items()
            if k not in ("prompt", "completion", "prompts", "completions")
        }
        total = np.zeros(n, dtype=np.float64)
        for t in self.terms:
            try:
                out = t.fn(list(prompts), list(completions), **cols)
            except Exception as e:  # noqa: BLE001 - the user's function may raise anything
                raise RewardError(
                    f"reward function {t.name} raised {type(e).__name__}: {e}"
                ) from None
            total += t.weight * check(out, n, t.name)
        return total


def check(out, n: int, name: str) -> np.ndarray:
    try:
        values = list(out)
    except TypeError:
        raise RewardError(
            f"reward function {name} returned {type(out).__name__}, not a list of numbers"
        ) from None
    if len(values) != n:
        raise RewardError(
            f"reward function {name} returned {len(values)} rewards for {n} completions"
        )
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise RewardError(f"reward function {name}: row {i}: {v!r} is not a number")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {name}: row {i}: {v!r} is not finite")
    return np.asarray(values, dtype=np.float64)


def describe(spec) -> str:
    return " + ".join(spec) if isinstance(spec, list) else str(spec)
