"""Evaluate a candidate policy against the one in production and promote it only if it is
better by more than the noise.

``evaluate_and_promote`` is the last step of the pipeline flow (``evaluate`` in
``pipeline.stages``); ``promote_pipeline`` is the same gate for any stored checkpoint::

    python -m flows.promote demo <checkpoint id or ref>

Production is the store ref ``<config name>-production``. When it is unset, the candidate is
compared with the SFT policy it was trained from (``promote.baseline: sft``) or promoted as it is
(``baseline: none``). Both policies are evaluated by the same cached evaluate stage on the same
held-out prompts; the promote stage records the decision; this flow then moves the ref (when the
decision says so) and, for a decision just made, emits the Prefect event
``mindrlhf.promotion.decided`` and publishes the ``promotion-<name>`` artifact. A candidate that
is already production is not evaluated again: an unchanged nightly run is all Cached."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows.pipeline import call, finished
from mindrlhf.config import Config, load_config
from mindrlhf.data.store import ArtifactNotFound, ArtifactStore
from mindrlhf.promote import production_ref
from tasks.assets import run_artifact_key
from tasks.stages import evaluate_task, prepare_task, promote_task


def current_production(store: ArtifactStore, name: str) -> str | None:
    """The policy in production, or None (never promoted, or its checkpoint is gone)."""
    try:
        return store.resolve(production_ref(name))
    except ArtifactNotFound:
        return None


def ancestor(store: ArtifactStore, ckpt: str, stage: str) -> str | None:
    """The nearest checkpoint in ``ckpt``'s lineage made by ``stage`` (itself included)."""
    for a in store.lineage(ckpt):
        if a.kind == "checkpoint" and a.meta.get("stage") == stage:
            return a.id
    return None


def evaluate_and_promote(
    c: dict, cfg: Config, d: dict, candidate: str, sft_ckpt: str, rm_ckpt: str | None, run: dict
) -> dict:
    logger = get_run_logger()
    store = ArtifactStore(cfg.store.root)
    ref = production_ref(cfg.name)
    production = current_production(store, cfg.name)
    incumbent = production or (sft_ckpt if cfg.promote.baseline == "sft" else None)
    if incumbent == candidate:
        logger.info(f"promote: {candidate[:12]} is already {ref}; nothing to evaluate")
        return {
            "promoted": False,
            "candidate": candidate,
            "production": production,
            "reason": "the candidate is already in production",
        }
    base = {"prompts": d[f"prompts_{cfg.evaluate.prompts}_heldout"], "sft": sft_ckpt}
    if rm_ckpt:
        base["rm"] = rm_ckpt
    ev = call(
        evaluate_task, "evaluate", c, {**base, "policy": candidate}, run, "evaluate_candidate"
    )
    inputs = {"candidate": ev["outputs"]["scores"], "policy": candidate}
    scores = {"candidate": ev["metrics"]}
    if incumbent is not None:
        inc = call(
            evaluate_task, "evaluate", c, {**base, "policy": incumbent}, run, "evaluate_production"
        )
        inputs.update(incumbent=inc["outputs"]["scores"], production=incumbent)
        scores["production"] = inc["metrics"]
    res = call(promote_task, "promote", c, inputs, run)
    decision = dict(res["decision"])
    if decision["promoted"]:
        store.set_ref(ref, candidate)  # idempotent: a cached decision is acted on again
        logger.info(f"promote: {ref} -> {candidate[:12]} ({decision['reason']})")
    else:
        kept = production[:12] if production else "unset (nothing promoted yet)"
        logger.info(f"promote: {ref} stays {kept} ({decision['reason']})")
    if run["states"]["promote"] != "Cached":  # a decision made now, not one served again
        announce(cfg.name, decision, scores, res["outputs"]["decision"])
    return {
        **decision,
        "decision": res["outputs"]["decision"],
        "scores": scores,
        "production": store.resolve(ref) if decision["promoted"] else production,
    }


def announce(name: str, decision: dict, scores: dict, decision_id: str) -> None:
    """The decision as a Prefect event (Automations can notify on it) and as the
    ``promotion-<name>`` markdown artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    emit_event(
        event="mindrlhf.promotion.decided",
        resource={
            "prefect.resource.id": f"mindrlhf.production.{name}",
            "prefect.resource.name": production_ref(name),
        },
        related=[
            {
                "prefect.resource.id": f"mindrlhf://checkpoint/{decision['candidate']}",
                "prefect.resource.role": "candidate",
            },
        ],
        payload={**decision, "decision_id": decision_id},
    )
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in decision.items()
    )
    figures = "\n".join(
        f"| {who} | "
        + " | ".join(
            f"{m.get(k, float('nan')):.4g}"
            for k in ("judge_mean", "rm_mean", "logratio_mean", "length_mean")
        )
        + " |"
        for who, m in scores.items()
    )
    md = (
        f"## Promotion: {'PROMOTED' if decision['promoted'] else 'production kept'}\n\n"
        f"{decision['reason']}\n\n| | judge | RM | log-ratio to SFT | length |\n"
        "|---|---|---|---|---|\n"
        f"{figures}\n\n| field | value |\n|---|---|\n{rows}\n"
    )
    create_markdown_artifact(
        key=run_artifact_key("promotion", name),
        markdown=md,
        description=f"promotion decision for {name}",
    )


@flow(name="promote")
def promote_pipeline(config: str = "demo", candidate: str = "", overrides: dict | None = None):
    """Evaluate a checkpoint against production and promote it if it is better.

    Args:
        config: a shipped profile (demo, smollm2-135m) or the path of a config YAML.
        candidate: a checkpoint id, id prefix or ref; empty: ``<name>-<promote.candidate>``, the
            newest checkpoint that stage wrote.
        overrides: config values over the file's, e.g. {"promote": {"min_delta": 0.01},
            "evaluate": {"n_prompts": 200}}.
    """
    cfg = load_config(config, overrides)
    c = cfg.to_dict()
    store = ArtifactStore(cfg.store.root)
    summary: dict = {"states": {}, "peak_rss_gb": {}, "store_root": cfg.store.root}
    d = call(prepare_task, "prepare", c, None, summary)["outputs"]
    cand = store.resolve(candidate or f"{cfg.name}-{cfg.promote.candidate}")
    sft = ancestor(store, cand, "sft")
    if sft is None:
        raise ValueError(f"{cand[:12]} descends from no SFT checkpoint: nothing to measure KL from")
    summary["promotion"] = evaluate_and_promote(
        c, cfg, d, cand, sft, ancestor(store, cand, "rm"), summary
    )
    get_run_logger().info("promotion:\n" + json.dumps(summary["promotion"], indent=1, default=str))
    return finished(summary)


if __name__ == "__main__":
    import sys

    promote_pipeline(*sys.argv[1:3])
