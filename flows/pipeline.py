"""The RLHF pipeline as a Prefect flow:

    prepare -> sft -> rm -> ppo
                  |     `-> online DPO rounds (policy_0 = SFT -> pairs_1 -> policy_1 -> ...)
                  |-> grpo (verifiable rewards)
                  `-> reference log-probs -> dpo   (no reference for orpo / simpo)

Each box is a cached Prefect task running one stage process; ``pipeline.stages`` in the config
chooses which run.
"""

from __future__ import annotations

import json
from typing import Literal

from prefect import flow, get_run_logger

from mindrlhf.config import DPOConfig, load_config
from tasks.assets import publish_lineage, record_lineage
from tasks.stages import (
    dpo_task,
    grpo_task,
    import_task,
    online_dpo_task,
    ppo_task,
    prepare_task,
    reflogp_task,
    rm_task,
    sft_task,
)


def call(
    task, stage: str, c: dict, inputs: dict | None, run: dict, label: str | None = None
) -> dict:
    """Run a stage task after the tasks that produced its inputs (Prefect records them as its
    upstream: the run graph has edges), record its outputs as Prefect assets (inputs upstream)
    and, in ``run``, its final state (Completed / Cached) and the peak resident memory of its
    process; the result."""
    producers = run.setdefault(
        "_producers", {}
    )  # artifact id -> the state of the task that made it
    upstream = [
        producers[i] for i in (inputs or {}).values() if isinstance(i, str) and i in producers
    ]
    state = task(stage, c, inputs, return_state=True, wait_for=list(dict.fromkeys(upstream, None)))
    result = state.result()
    for art in result.get("outputs", {}).values():
        if isinstance(art, str):
            producers[art] = state
    record_lineage(
        stage,
        c["store"]["root"],
        result.get("outputs", {}),
        inputs or {},
        after=state,
        cached=state.name == "Cached",
    )
    label = label or stage
    run["states"][label] = state.name
    if result.get("peak_rss_mb") is not None:
        run["peak_rss_gb"][label] = round(result["peak_rss_mb"] / 1024, 2)
    return result


def call_chunked(task, stage: str, c: dict, inputs: dict, run: dict) -> dict:
    """An RL loop as one task, or -- with ``<stage>.iterations_per_task`` -- as a chain of tasks
    ``<stage>_0, <stage>_1, ...`` of that many iterations each: chunk k starts from the training
    state chunk k-1 wrote (cached on it), a failed chunk retries alone, and the last one writes
    what the single task would have written, byte for byte."""
    sec = c[stage]
    per, total = sec.get("iterations_per_task") or 0, sec["iterations"]
    if not per or per >= total:
        return call(task, stage, c, inputs, run)
    state = None
    for k, start in enumerate(range(0, total, per)):
        cc = {**c, stage: {**sec, "span": [start, min(start + per, total)]}}
        res = call(
            task, stage, cc, {**inputs, **({"state": state} if state else {})}, run, f"{stage}_{k}"
        )
        if "checkpoint" in res["outputs"]:  # the last chunk (or a loop stopped early)
            return res
        state = res["outputs"]["state"]
    raise RuntimeError(f"{stage}: the last chunk wrote no checkpoint")


def finished(summary: dict) -> dict:
    """The summary a flow returns: the task states it kept to draw edges are not part of it."""
    summary.pop("_producers", None)
    return summary


def dpo_plan(c: dict, d: dict, sft_ckpt: str) -> tuple[dict | None, dict]:
    """The DPO branch's graph for ``dpo.loss``: (the reflogp task's inputs, or None when the loss
    is reference-free and the branch skips it; the dpo task's inputs but the reference ids).
    KTO also reads the unpaired examples, and asks reflogp for its per-example layout."""
    dc = DPOConfig(**c["dpo"])
    kto = dc.loss == "kto"
    kinds = ("pairs", "unpaired") if kto else ("pairs",)
    data = {
        (s if kind == "pairs" else f"unpaired_{s}"): d[f"{kind}_{s}"]
        for kind in kinds
        for s in ("train", "heldout")
        if f"{kind}_{s}" in d
    }
    if not ({"train", "unpaired_train"} & set(data)):
        what = "pairs or unpaired examples" if kto else "pairs"
        kind = "pairs or unpaired" if kto else "pairs"
        raise ValueError(
            f"dpo.loss {dc.loss} needs preference {what}: a recipe that builds them or a "
            f"data.sources entry of kind {kind}"
        )
    inputs = {**data, "sft": sft_ckpt}
    if dc.reference_free:
        return None, inputs
    return {**data, "model": sft_ckpt, **({"examples": "kto"} if kto else {})}, inputs


def run_dpo_branch(c: dict, d: dict, sft_ckpt: str, run: dict) -> dict:
    ref_inputs, inputs = dpo_plan(c, d, sft_ckpt)
    if ref_inputs is not None:  # reference-free losses (orpo, simpo) skip the reference model
        ref = call(reflogp_task, "reflogp", c, ref_inputs, run)
        inputs.update(ref_train=ref["outputs"]["train"], ref_heldout=ref["outputs"]["heldout"])
    dpo = call(dpo_task, "dpo", c, inputs, run)
    return {"checkpoint": dpo["outputs"]["checkpoint"], **dpo["metrics"]}


def run_online_dpo(c: dict, cfg, d: dict, sft_ckpt: str, rm_ckpt: str, run: dict) -> dict:
    oc = cfg.online_dpo
    policy, scores, pairs = sft_ckpt, [], []
    for r in range(oc.rounds):
        res = call(
            online_dpo_task,
            "online_dpo",
            c,
            {
                "policy": policy,
                "reference": sft_ckpt,
                "rm": rm_ckpt,
                "round": r,
                "prompts": d[f"prompts_{oc.prompts}_train"],
                "heldout": d[f"prompts_{oc.prompts}_heldout"],
            },
            run,
            f"online_dpo_{r}",
        )
        if r == 0:
            scores.append(res["metrics"]["heldout_score_before"])
        scores.append(res["metrics"]["heldout_score_after"])
        policy = res["outputs"]["checkpoint"]
        pairs.append(res["outputs"]["pairs"])
    return {
        "checkpoint": policy,
        "heldout_score_by_round": [round(s, 4) for s in scores],
        "pair_datasets": pairs,
    }


Stage = Literal["prepare", "sft", "rm", "ppo", "grpo", "dpo", "online_dpo", "evaluate"]


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(
    config: str = "demo", overrides: dict | None = None, stages: list[Stage] | None = None
) -> dict:
    """The whole chain, each stage a cached task; ``evaluate`` ends it with the promotion gate.

    Args:
        config: a shipped profile (demo, smollm2-135m) or the path of a config YAML.
        overrides: config values over the file's, nested by section, e.g.
            {"sft": {"steps": 100}, "ppo": {"iterations": 5, "kl_coef": 0.05},
            "promote": {"min_delta": 0.01}}; unknown keys are refused with the known ones listed.
        stages: the stages to run, in place of the config's pipeline.stages (empty: the config's).
    """
    if stages:
        overrides = {**(overrides or {}), "pipeline": {"stages": list(stages)}}
    cfg = load_config(config, overrides)
    c = cfg.to_dict()
    stages = cfg.pipeline.stages
    logger = get_run_logger()
    summary: dict = {"states": {}, "peak_rss_gb": {}, "store_root": cfg.store.root}
    data = call(prepare_task, "prepare", c, None, summary)
    d = summary["datasets"] = data["outputs"]
    if "sft" not in stages:
        return finished(summary)
    sft_inputs = {"train": d["sft_train"], "heldout": d["sft_heldout"]}
    if cfg.model.init.startswith("artifact:"):  # a stored checkpoint (a previous run's SFT, say)
        from mindrlhf.data.store import ArtifactStore

        sft_inputs["init"] = ArtifactStore(cfg.store.root).resolve(
            cfg.model.init[len("artifact:") :]
        )
    elif (
        cfg.model.init
    ):  # pretrained weights (a Hugging Face directory, a GGUF file) as SFT's start
        imp = call(import_task, "import_weights", c, None, summary, "import")
        sft_inputs["init"] = imp["outputs"]["checkpoint"]
        summary["import"] = {"checkpoint": sft_inputs["init"], **imp["metrics"]}
    sft = call(sft_task, "sft", c, sft_inputs, summary)
    sft_ckpt = sft["outputs"]["checkpoint"]
    summary["sft"] = {
        "checkpoint": sft_ckpt,
        **sft["metrics"],
        "samples": sft.get("samples", []),
        "loss_curve": sft.get("loss_curve", []),
    }
    rm_ckpt = None
    if "rm" in stages:
        rm = call(
            rm_task,
            "rm",
            c,
            {"train": d["pairs_train"], "heldout": d["pairs_heldout"], "sft": sft_ckpt},
            summary,
        )
        rm_ckpt = rm["outputs"]["checkpoint"]
        summary["rm"] = {"checkpoint": rm_ckpt, **rm["metrics"]}
    if "ppo" in stages:
        p = cfg.ppo.prompts
        ppo = call_chunked(
            ppo_task,
            "ppo",
            c,
            {
                "prompts": d[f"prompts_{p}_train"],
                "heldout": d[f"prompts_{p}_heldout"],
                "sft": sft_ckpt,
                "rm": rm_ckpt,
            },
            summary,
        )
        summary["ppo"] = {"checkpoint": ppo["outputs"]["checkpoint"], **ppo["metrics"]}
    if "grpo" in stages:
        g = cfg.grpo.prompts
        inputs = {
            "prompts": d[f"prompts_{g}_train"],
            "heldout": d[f"prompts_{g}_heldout"],
            "sft": sft_ckpt,
        }
        if cfg.grpo.reward == "rm":
            inputs["rm"] = rm_ckpt
        grpo = call_chunked(grpo_task, "grpo", c, inputs, summary)
        summary["grpo"] = {"checkpoint": grpo["outputs"]["checkpoint"], **grpo["metrics"]}
    if "dpo" in stages:
        summary["dpo"] = run_dpo_branch(c, d, sft_ckpt, summary)
    if "online_dpo" in stages:
        summary["online_dpo"] = run_online_dpo(c, cfg, d, sft_ckpt, rm_ckpt, summary)
    if "evaluate" in stages:  # the gate: production moves only to a better policy
        from flows.promote import evaluate_and_promote

        cand = summary[cfg.promote.candidate]["checkpoint"]
        summary["promotion"] = evaluate_and_promote(c, cfg, d, cand, sft_ckpt, rm_ckpt, summary)
    finals = [
        part["checkpoint"]
        for part in (summary.get(k) for k in ("sft", "rm", "ppo", "grpo", "dpo", "online_dpo"))
        if isinstance(part, dict) and part.get("checkpoint")
    ]
    publish_lineage(cfg.name, cfg.store.root, finals)
    logger.info(
        "pipeline summary:\n"
        + json.dumps(
            {k: v for k, v in summary.items() if k not in ("datasets", "_producers")}, indent=1
        )
    )
    return finished(summary)


if __name__ == "__main__":
    import sys

    from mindrlhf.report import format_summary

    print(format_summary(rlhf_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo")))
