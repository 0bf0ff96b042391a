"""Prepare stage: build a recipe's text datasets from pinned registry packages, validate them and
tokenize them, each table a versioned Arrow artifact (text -> tokens lineage in the manifests).

Output ids: ``<table>_text`` for every table the recipe builds and ``sft_train`` / ``sft_heldout``
token datasets for the SFT stage.
"""
from __future__ import annotations

from ..data import registry
from ..data.recipes import load_recipe
from ..data.schema import validate_table
from ..data.tokenize import tokenize_sft
from ..data.tokenizer import load_tokenizer
from .common import StageContext, stage_main

TEXT_SCHEMAS = {"sft": "sft_text", "pairs": "pairs_text", "prompts": "prompts_text"}


def run(ctx: StageContext) -> None:
    dc = ctx.cfg.data
    recipe = load_recipe(dc.recipe)
    sources = {k: {"spec": registry.PINS[k].spec, "sha256": registry.PINS[k].sha256,
                   "license": registry.PINS[k].license} for k in recipe.SOURCES}
    tables = recipe.build(dc)
    outputs, counts = {}, {}
    for name, table in tables.items():
        schema = TEXT_SCHEMAS.get(name.split("_", 1)[0])
        if schema:
            validate_table(table, schema, f"recipe {dc.recipe}: table {name}")
        art = ctx.store.write_dataset(table, name=f"{dc.recipe}-{name}",
                                      meta={"recipe": dc.recipe, "sources": sources, "table": name})
        outputs[f"{name}_text"] = art.id
        counts[name] = table.num_rows
        ctx.log(f"{name}: {table.num_rows} rows -> {art.id[:12]}")
    tok = load_tokenizer(ctx.cfg.tokenizer.kind)
    for split in ("train", "heldout"):
        text_id = outputs[f"sft_{split}_text"]
        tokens = tokenize_sft(ctx.store.read_dataset(text_id), tok, dc.max_prompt_len, dc.max_len)
        art = ctx.store.write_dataset(tokens, name=f"{dc.recipe}-sft-{split}-tokens", parents=[text_id],
                                      meta={"tokenizer": tok.name, "max_prompt_len": dc.max_prompt_len,
                                            "max_len": dc.max_len})
        outputs[f"sft_{split}"] = art.id
        ctx.log(f"sft_{split} tokens: {tokens.num_rows} rows -> {art.id[:12]}")
    ctx.finish(outputs, {f"rows_{k}": v for k, v in counts.items()})


if __name__ == "__main__":
    stage_main("prepare", run, mindspore=False)
