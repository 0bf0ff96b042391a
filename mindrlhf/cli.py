"""``mindrlhf``: run the pipeline or one stage, and look into the artifact store.

mindrlhf run [CONFIG] [--set sft.lr=0.001 ...]       the Prefect pipeline flow
mindrlhf stage NAME [CONFIG] --input train=ID ...    one stage process, no Prefect
mindrlhf artifacts [--kind dataset|checkpoint]       what the store holds
mindrlhf lineage REF                                 an artifact and its ancestors
mindrlhf show REF [--rows 5]                         a dataset's schema and first rows
mindrlhf import FILE --kind sft|pairs [--name N]     JSONL / Parquet user data -> dataset
mindrlhf export REF --out DIR                        checkpoint -> HF safetensors + config.json
mindrlhf verify                                      re-hash every artifact, check refs and staging
mindrlhf init-config --model hf:DIR                  a starting config derived from a model
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import yaml

from .config import ConfigError, load_config
from .data.schema import DataError
from .data.store import ArtifactNotFound, ArtifactStore, IntegrityError, atomic_write_bytes
from .launch import StageFailed, process_tree
from .prefect_api import PrefectLost, PrefectUnavailable

STAGE_NAMES = (
    "prepare",
    "import_weights",
    "sft",
    "rm",
    "ppo",
    "grpo",
    "reflogp",
    "dpo",
    "online_dpo",
)


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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})"
            ) from None
    return out


def total_steps(cfg, stage: str) -> int | None:
    return {
        "sft": cfg.sft.steps,
        "rm": cfg.rm.steps,
        "ppo": cfg.ppo.iterations,
        "grpo": cfg.grpo.iterations,
        "dpo": cfg.dpo.steps,
    }.get(stage)


def cmd_run(args) -> int:
    from .prefect_api import bound_client, check_api

    overrides = parse_sets(args.set)
    load_config(args.config, overrides)  # a bad config fails here, before Prefect starts
    bound_client()
    check_api()
    from flows.pipeline import rlhf_pipeline

    from .report import format_summary

    try:
        summary = rlhf_pipeline(args.config, overrides)
    except Exception as e:
        lost = api_lost(e)
        if lost is None:
            raise
        raise PrefectLost(
            f"lost the Prefect API during the run ({lost}); the stages that finished have their "
            "outputs in the store, verified, and a rerun reuses them"
        ) from None
    print(format_summary(summary))
    return 0


def api_lost(e: BaseException) -> str | None:
    """A description if ``e`` (or what caused it) is the Prefect client failing to reach its API."""
    import httpx

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (httpx.TransportError, httpx.HTTPStatusError)):
            return f"{type(e).__name__}: {e}"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def cmd_stage(args) -> int:
    from .launch import run_stage

    if args.name not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {args.name!r} (known: {', '.join(STAGE_NAMES)})")
    cfg = load_config(args.config, parse_sets(args.set))
    bad = [kv for kv in args.input if "=" not in kv]
    if bad:
        raise ConfigError(f"--input {bad[0]!r}: expected NAME=ARTIFACT_ID")
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
    from .keys import stage_key

    run_dir = (
        args.run_dir
        or f"{root}/runs/cli-{args.name}-{stage_key(args.name, cfg.to_dict(), inputs)[:16]}"
    )
    result = run_stage(
        args.name, cfg, inputs, root, run_dir, log=log, config_source=str(args.config)
    )
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
    if args.format != "text":
        from . import lineage

        nodes = lineage.graph(store, [args.ref])
        render = {"dot": lineage.to_dot, "json": lineage.to_json}.get(args.format)
        print(render(nodes) if render else lineage.to_svg(nodes, f"lineage of {args.ref}"), end="")
        return 0
    for a in store.lineage(args.ref):
        print(
            f"{a.id[:16]}  {a.kind:10s}  {a.name}  <- "
            f"{', '.join(p[:12] for p in a.parents) or '(source)'}"
        )
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
    from .config import ModelConfig, section_from_dict
    from .models.hf import export_hf

    store = ArtifactStore(args.store)
    art = store.get(args.ref)
    if "model" not in art.meta:
        raise ValueError(f"artifact {art.id[:12]} ({art.name}) has no model config in its manifest")
    cfg = section_from_dict(
        ModelConfig, art.meta["model"], "model", f"artifact {art.id[:12]} ({art.name}) manifest"
    )
    from .models.lora import read_weights

    tensors = read_weights(store, art.id)  # LoRA adapters merged into their base
    if "score.weight" in tensors:
        raise ValueError(f"{art.name} is a reward/value model; export takes a policy checkpoint")
    out = export_hf(cfg, tensors, args.out, source=f"artifact {art.id[:12]} ({art.name})")
    # the tokenizer the weights were imported with, if any; the ancestors a user removed (the
    # datasets of an old run, say) are not needed for that
    for a in store.lineage(art.id, skip_missing=True):
        if "tokenizer.json" in a.manifest["files"]:
            a = store.get(a.id)  # verified
            for fname in a.manifest["files"]:
                if fname.startswith(("tokenizer", "special_tokens", "generation_config")):
                    atomic_write_bytes(Path(out) / fname, a.file(fname).read_bytes())
            break
    print(f"{art.id[:16]} {art.name} -> {out}/model.safetensors, {out}/config.json")
    return 0


INIT_TEMPLATE = """# A starting config for {spec}: mindrlhf run this.yaml
# (paths are relative to this file).
# The model section's sizes come from the source when the config loads (a key set here must agree):
#   {derived}
name: {name}
model:
  init: {spec}
  max_seq_len: {seq}         # the source allows {src_seq}; lower is cheaper
{unrecorded}data:
  recipes: []
  max_prompt_len: {prompt}
  max_len: {seq}
  sources:  # jsonl / parquet / arrow / csv / datasets directories; fields maps columns
    - {{kind: sft, path: data/sft.jsonl, format: chat}}  # {{"messages": [{{"role", "content"}}]}}
    - {{kind: pairs, path: data/pairs.jsonl}}                    # prompt, chosen, rejected
    - {{kind: prompts, path: data/prompts.jsonl, name: prompts}}  # prompt (+ answer, ...)
pipeline:
  stages: [prepare, sft, rm, ppo, grpo, dpo, online_dpo]
ppo: {{prompts: prompts}}
grpo:
  prompts: prompts
  reward: python:reward.py:correct   # fn(prompts, completions, **columns) -> list[float]
online_dpo: {{prompts: prompts}}
"""


def cmd_init_config(args) -> int:
    from .models import sources

    src = sources.parse(args.model)
    where = (
        src.where
        if src.kind == "artifact" or src.where == "smollm2"
        else str(Path(src.where).resolve())
    )
    if src.kind == "pangualpha" and not args.n_heads:
        raise ValueError(
            f"{args.model}: a Pangu-alpha checkpoint does not record its number of attention "
            "heads; pass --n-heads N (Pangu-alpha 2.6B has 32, 13B has 40)"
        )
    d = sources.derive_config(sources.Source(src.kind, where), args.store, args.n_heads)
    derived = "  ".join(
        f"{k}: {getattr(d, k)}" for k in sources.DERIVED if getattr(d, k) not in (None, "")
    )
    seq = min(d.max_seq_len, 512)
    unrecorded = ""  # what the config must say because the source does not
    if src.kind == "pangualpha":
        unrecorded = (
            f"  n_heads: {d.n_heads}            # not recorded in the checkpoint (--n-heads)\n"
            "tokenizer:  # Pangu-alpha's tokenizer is not in its checkpoint: a tokenizer.json dir\n"
            "  kind: hf\n  path: tokenizer\n"
        )
    print(
        INIT_TEMPLATE.format(
            spec=args.model,
            derived=derived,
            name=args.name,
            seq=seq,
            src_seq=d.max_seq_len,
            prompt=seq // 2,
            unrecorded=unrecorded,
        ),
        end="",
    )
    return 0


def cmd_verify(args) -> int:
    store = ArtifactStore(args.store)
    problems = store.verify_all()
    n = len(store.ids())
    for p in problems:
        print(p)
    print(
        f"{n} artifacts in {store.root}: "
        + (f"{len(problems)} problem(s)" if problems else "all verified")
    )
    return 1 if problems else 0


def _terminate(signum, frame):
    raise SystemExit(
        128 + signum
    )  # unwinds: a running stage's process tree is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mindrlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    for name, fn, help_ in (
        ("artifacts", cmd_artifacts, "list artifacts"),
        ("lineage", cmd_lineage, "ancestors"),
        ("show", cmd_show, "dataset rows"),
        ("verify", cmd_verify, "check the whole store"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--store", default="artifacts")
        if name == "artifacts":
            p.add_argument("--kind", choices=["dataset", "checkpoint"])
        elif name != "verify":
            p.add_argument("ref")
        if name == "show":
            p.add_argument("--rows", type=int, default=5)
        if name == "lineage":
            p.add_argument("--format", choices=["text", "dot", "svg", "json"], default="text")
        p.set_defaults(fn=fn)
    p = sub.add_parser("import", help="import JSONL / Parquet user data")
    p.add_argument("file")
    p.add_argument("--kind", choices=["sft", "pairs"], required=True)
    p.add_argument("--name")
    p.add_argument("--store", default="artifacts")
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser(
        "init-config", help="print a starting config for a model (hf:DIR, gguf:FILE, ...)"
    )
    p.add_argument("--model", required=True, metavar="SOURCE")
    p.add_argument("--name", default="my-run")
    p.add_argument("--store", default="artifacts")
    p.add_argument(
        "--n-heads",
        type=int,
        help="attention heads, for a source that does not record them (pangualpha:FILE.ckpt)",
    )
    p.set_defaults(fn=cmd_init_config)
    p = sub.add_parser(
        "export", help="export a checkpoint as Hugging Face safetensors + config.json"
    )
    p.add_argument("ref")
    p.add_argument("--out", required=True)
    p.add_argument("--store", default="artifacts")
    p.set_defaults(fn=cmd_export)
    args = ap.parse_args(argv)
    if argv is None:  # the command line, not a test calling main(): SIGTERM unwinds like Ctrl-C
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.fn(args)
    except (StageFailed, PrefectUnavailable) as e:
        print(f"mindrlhf: {e}", file=sys.stderr)
        if argv is None and isinstance(e, PrefectLost) and len(process_tree(os.getpid())) == 1:
            # At exit Prefect's event and log workers would try to deliver what they still hold to
            # the API that is gone, each item ~7 s of failed connections (~40 s in
            # tests/test_prefect_faults.py): nothing can be delivered and the store holds the
            # outputs, so with no stage process left to wait for (the tree is this process
            # alone), end now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except (ArtifactNotFound, KeyError) as e:
        print(f"mindrlhf: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, IntegrityError, ValueError, OSError) as e:
        print(f"mindrlhf: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mindrlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
