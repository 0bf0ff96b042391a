"""``mindrlhf``: run the pipeline or one stage, and look into the artifact store.

    mindrlhf run [CONFIG] [--set sft.lr=0.001 ...]       the Prefect pipeline flow
    mindrlhf stage NAME [CONFIG] --input train=ID ...    one stage process, no Prefect
    mindrlhf artifacts [--kind dataset|checkpoint]       what the store holds
    mindrlhf lineage REF                                 an artifact and its ancestors
    mindrlhf show REF [--rows 5]                         a dataset's schema and first rows
    mindrlhf import FILE --kind sft|pairs [--name N]     JSONL / Parquet user data -> dataset
    mindrlhf export REF --out DIR                        checkpoint -> HF safetensors + config.json
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from .config import ConfigError, load_config
from .data.schema import DataError
from .data.store import ArtifactStore, IntegrityError


def parse_sets(items: list[str]) -> dict:
    """``a.b=1`` pairs -> nested dict, values parsed as YAML scalars (1, 0.5, true, text)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def total_steps(cfg, stage: str) -> int | None:
    return {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "ppo": cfg.ppo.iterations, "grpo": cfg.grpo.iterations,
            "dpo": cfg.dpo.steps}.get(stage)


def cmd_run(args) -> int:
    from flows.pipeline import rlhf_pipeline

    from .report import format_summary

    print(format_summary(rlhf_pipeline(args.config, parse_sets(args.set))))
    return 0


def cmd_stage(args) -> int:
    from .launch import run_stage

    cfg = load_config(args.config, parse_sets(args.set))
    inputs = dict(kv.split("=", 1) for kv in args.input)
    total = total_steps(cfg, args.name)
    bar = None
    if total and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=args.name, unit="step")

    def log(line: str) -> None:
        if line.startswith("METRIC ") and bar is not None:
            step = json.loads(line[7:]).get("step", 0)
            bar.update(max(0, step - bar.n))
        elif bar is None or not line.startswith("METRIC "):
            print(line, flush=True)

    root = cfg.store.root
    result = run_stage(args.name, cfg, inputs, root, args.run_dir or f"{root}/runs/cli-{args.name}", log=log)
    if bar is not None:
        bar.close()
    print(json.dumps({"outputs": result["outputs"], "metrics": result["metrics"]}, indent=1))
    return 0


def cmd_artifacts(args) -> int:
    store = ArtifactStore(args.store)
    for a in store.list(args.kind):
        rows = a.manifest.get("num_rows")
        print(f"{a.id[:16]}  {a.kind:10s}  {a.name:40s}  {'' if rows is None else f'{rows} rows'}")
    return 0


def cmd_lineage(args) -> int:
    store = ArtifactStore(args.store)
    for depth, a in enumerate(store.lineage(args.ref)):
        print(f"{a.id[:16]}  {a.kind:10s}  {a.name}  <- {', '.join(p[:12] for p in a.parents) or '(source)'}")
    return 0


def cmd_show(args) -> int:
    store = ArtifactStore(args.store)
    table = store.read_dataset(args.ref)
    print(f"{table.num_rows} rows\n{table.schema}")
    for row in table.slice(0, args.rows).to_pylist():
        print(json.dumps(row, default=str)[:400])
    return 0


def cmd_import(args) -> int:
    from .data.user_import import import_file

    art = import_file(args.file, args.kind, ArtifactStore(args.store), name=args.name)
    print(f"{art.id}  {art.name}  {art.manifest['num_rows']} rows")
    return 0


def cmd_export(args) -> int:
    from .config import ModelConfig
    from .models.hf import export_hf

    store = ArtifactStore(args.store)
    art = store.get(args.ref)
    if "model" not in art.meta:
        raise ValueError(f"artifact {art.id[:12]} ({art.name}) has no model config in its manifest")
    cfg = ModelConfig(**art.meta["model"])
    tensors = store.read_checkpoint(art.id)
    if "score.weight" in tensors:
        raise ValueError(f"{art.name} is a reward/value model; export takes a policy checkpoint")
    out = export_hf(cfg, tensors, args.out)
    print(f"{art.id[:16]} {art.name} -> {out}/model.safetensors, {out}/config.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mindrlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the pipeline flow")
    p.add_argument("config", nargs="?", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("stage", help="run one stage process")
    p.add_argument("name")
    p.add_argument("config", nargs="?", default="demo")
    p.add_argument("--input", action="append", default=[], metavar="NAME=ARTIFACT_ID")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir")
    p.set_defaults(fn=cmd_stage)
    for name, fn, help_ in (("artifacts", cmd_artifacts, "list artifacts"), ("lineage", cmd_lineage, "ancestors"),
                            ("show", cmd_show, "dataset rows")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--store", default="artifacts")
        if name == "artifacts":
            p.add_argument("--kind", choices=["dataset", "checkpoint"])
        else:
            p.add_argument("ref")
        if name == "show":
            p.add_argument("--rows", type=int, default=5)
        p.set_defaults(fn=fn)
    p = sub.add_parser("import", help="import JSONL / Parquet user data")
    p.add_argument("file")
    p.add_argument("--kind", choices=["sft", "pairs"], required=True)
    p.add_argument("--name")
    p.add_argument("--store", default="artifacts")
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser("export", help="export a checkpoint as Hugging Face safetensors + config.json")
    p.add_argument("ref")
    p.add_argument("--out", required=True)
    p.add_argument("--store", default="artifacts")
    p.set_defaults(fn=cmd_export)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, IntegrityError, KeyError, ValueError) as e:
        print(f"mindrlhf: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
