"""Prepare stage: build each recipe's text tables from pinned registry packages, validate them,
and tokenize them; every table a versioned Arrow artifact whose manifest names its parent.

Outputs (artifact ids):
  <recipe>_<table>_text              every text table each recipe builds
  sft_train, sft_heldout             SFT tokens, all recipes' SFT tables concatenated
  pairs_train, pairs_heldout         preference pairs (recipes that build them)
  unpaired_train, unpaired_heldout   labelled single completions (data sources of kind unpaired)
  prompts_<recipe>_train / _heldout  prompt tokens with their labels, per recipe
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..data import registry
from ..data.recipes import load_recipe
from ..data.schema import DataError, validate_table
from ..data.sources import build_source
from ..data.tokenize import tokenize_pairs, tokenize_prompts, tokenize_sft, tokenize_unpaired
from ..data.tokenizer import load_tokenizer
from ..keys import file_sha256
from .common import StageContext, stage_main

TEXT_SCHEMAS = {
    "sft": "sft_text",
    "pairs": "pairs_text",
    "prompts": "prompts_text",
    "unpaired": "unpaired_text",
}
SPLITS = ("train", "heldout")


def run(ctx: StageContext) -> None:
    dc = ctx.cfg.data
    tok = load_tokenizer(ctx.cfg.tokenizer)
    tok_meta = {"tokenizer": tok.name, "max_prompt_len": dc.max_prompt_len, "max_len": dc.max_len}
    outputs, counts = {}, {}
    by_kind: dict[str, list[tuple[str, pa.Table]]] = {}

    def add(name: str, table_name: str, table: pa.Table, meta: dict) -> None:
        art = ctx.store.write_dataset(
            table, name=f"{name}-{table_name}", meta={**meta, "table": table_name}
        )
        outputs[f"{name}_{table_name}_text"] = art.id
        counts[f"{name}_{table_name}"] = table.num_rows
        by_kind.setdefault(table_name, []).append((name, art.id))
        ctx.log(f"{name}/{table_name}: {table.num_rows} rows -> {art.id[:12]}")

    # every user file read and checked before anything is written
    built = [
        (spec, build_source(spec, i, dc.heldout_fraction))
        for i, spec in enumerate(dc.sources)
        if spec.path
    ]
    for name in dc.all_recipes:
        recipe = load_recipe(name)
        sources = {
            k: {
                "spec": registry.PINS[k].spec,
                "sha256": registry.PINS[k].sha256,
                "license": registry.PINS[k].license,
            }
            for k in recipe.SOURCES
        }
        for table_name, table in recipe.build(dc).items():
            schema = TEXT_SCHEMAS.get(table_name.split("_", 1)[0])
            if schema:
                validate_table(table, schema, f"recipe {name}: table {table_name}")
            add(name, table_name, table, {"recipe": name, "sources": sources})
    for spec, tables in built:
        files = [
            {"name": f.name, "sha256": file_sha256(f), "bytes": f.stat().st_size}
            for f in _files(spec.path)
        ]
        for table_name, table in tables.items():
            add(
                spec.label,
                table_name,
                table,
                {"source": {"kind": spec.kind, "format": spec.format, "files": files}},
            )

    def tokenized(kind: str, split: str, fn, out_name: str, sources: list[tuple[str, str]]):
        parts = [
            fn(ctx.store.read_dataset(i), tok, dc.max_prompt_len, dc.max_len) for _, i in sources
        ]
        table = pa.concat_tables(parts, promote_options="permissive")
        art = ctx.store.write_dataset(
            table,
            name=f"{ctx.cfg.name}-{out_name}",
            parents=[i for _, i in sources],
            meta={**tok_meta, "kind": kind, "split": split},
        )
        outputs[out_name] = art.id
        ctx.log(f"{out_name}: {table.num_rows} rows -> {art.id[:12]}")

    if not by_kind.get("sft_train"):
        raise DataError("no SFT rows: give data.recipes or a data.sources entry of kind sft")
    for split in SPLITS:
        tokenized("sft", split, tokenize_sft, f"sft_{split}", by_kind[f"sft_{split}"])
        if by_kind.get(f"pairs_{split}"):
            tokenized("pairs", split, tokenize_pairs, f"pairs_{split}", by_kind[f"pairs_{split}"])
        if by_kind.get(f"unpaired_{split}"):
            tokenized(
                "unpaired",
                split,
                tokenize_unpaired,
                f"unpaired_{split}",
                by_kind[f"unpaired_{split}"],
            )
        for recipe_name, text_id in by_kind.get(f"prompts_{split}", []):
            tokenized(
                "prompts",
                split,
                lambda t, tk, mp, ml: tokenize_prompts(t, tk, mp),
                f"prompts_{recipe_name}_{split}",
                [(recipe_name, text_id)],
            )
    pins = {k for n in dc.all_recipes for k in load_recipe(n).SOURCES}
    pins |= (
        {"gpt2-bpe"}
        if ctx.cfg.tokenizer.kind == "gpt2_bpe"
        else {"smollm2"}
        if ctx.cfg.tokenizer.kind == "smollm2"
        else set()
    )
    ctx.finish(outputs, {f"rows_{k}": v for k, v in counts.items()}, sources=sorted(pins))


def _files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]


if __name__ == "__main__":
    stage_main("prepare", run, mindspore=False)
