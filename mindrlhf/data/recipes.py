"""Dataset recipes live in the repository's ``datasets/`` folder, one module per recipe, each with
``build(data_cfg) -> {table_name: pyarrow.Table}`` and ``SOURCES`` (the registry pins it reads)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

from . import registry

RECIPE_DIR = Path(__file__).resolve().parents[2] / "datasets"


def load_recipe(name: str) -> ModuleType:
    path = RECIPE_DIR / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"no dataset recipe {name!r} at {path}")
    spec = importlib.util.spec_from_file_location(f"mindrlhf_recipes.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def heldout_split(namespace: str, key: str, heldout_fraction: float) -> str:
    """ "heldout" or "train" from a hash of ``namespace:key``: a row's split never depends on which
    other rows were generated, so a held-out item cannot leak into training."""
    h = int.from_bytes(hashlib.sha256(f"{namespace}:{key}".encode()).digest()[:4], "big")
    return "heldout" if h / 2**32 < heldout_fraction else "train"


def recipe_fingerprint(name: str) -> str:
    """Changes when the recipe's code or any pinned source it reads changes."""
    mod = load_recipe(name)
    h = hashlib.sha256(Path(mod.__file__).read_bytes())
    for key in mod.SOURCES:
        h.update(registry.PINS[key].sha256.encode())
    return h.hexdigest()
