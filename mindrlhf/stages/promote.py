"""Promote stage: ``python -m mindrlhf.stages.promote --spec S --out O``.

Inputs: ``candidate`` (the evaluate stage's scores of the candidate policy) and ``policy`` (that
policy), and, when something is in production, ``incumbent`` / ``production`` (the same for the
policy in production). The gate (:mod:`mindrlhf.promote`) compares the two on ``promote.metric``
prompt by prompt; the decision -- both means, the difference, its interval, the winner -- is a
one-row dataset whose parents are the two score tables. Moving the production ref is the flow's
job: it acts on this decision whether it was just made or served from the cache."""

from __future__ import annotations

import pyarrow as pa

from ..promote import decide, production_ref
from .common import StageContext, stage_main


def run(ctx: StageContext) -> None:
    pc, inputs, store = ctx.cfg.promote, ctx.inputs, ctx.store
    cand = store.read_dataset(inputs["candidate"])
    metric = pc.metric
    if metric not in cand.column_names:
        raise ValueError(
            f"promote.metric is {metric!r} but the evaluation {inputs['candidate'][:12]} has no "
            f"such column (it has {', '.join(cand.column_names)})"
        )
    if inputs.get("incumbent"):
        inc = store.read_dataset(inputs["incumbent"])
        if inc.column("prompt").to_pylist() != cand.column("prompt").to_pylist():
            raise ValueError(
                f"evaluations {inputs['candidate'][:12]} and {inputs['incumbent'][:12]} are not on "
                "the same prompts: they cannot be compared"
            )
        d = decide(
            cand.column(metric).to_numpy(),
            inc.column(metric).to_numpy(),
            pc.min_delta,
            pc.confidence,
            pc.resamples,
            pc.seed,
        )
    else:
        mean = float(cand.column(metric).to_numpy().mean())
        d = {
            "candidate_mean": mean,
            "incumbent_mean": None,
            "n": cand.num_rows,
            "promoted": True,
            "winner": "candidate",
            "reason": "nothing in production yet (promote.baseline: none)",
        }
    d.update(
        metric=metric,
        candidate=inputs["policy"],
        incumbent=inputs.get("production"),
        ref=production_ref(ctx.cfg.name),
    )
    ctx.log(
        f"{metric}: candidate {d['candidate_mean']:.4g} vs production "
        f"{d['incumbent_mean'] if d['incumbent_mean'] is None else round(d['incumbent_mean'], 4)}"
        f" -> {'PROMOTE' if d['promoted'] else 'keep production'}: {d['reason']}"
    )
    row = {k: [v] for k, v in d.items()}
    art = store.write_dataset(
        pa.table(row),
        name=f"{ctx.cfg.name}-promotion",
        parents=[inputs["candidate"]] + ([inputs["incumbent"]] if inputs.get("incumbent") else []),
        meta={"stage": "promote", "decision": d},
    )
    metrics = {k: d[k] for k in ("candidate_mean", "delta", "low", "high", "promoted") if k in d}
    ctx.finish({"decision": art.id}, metrics, decision=d)


if __name__ == "__main__":
    stage_main("promote", run, mindspore=False)
