"""Plain-text report of a pipeline run, printed at the end of ``make demo``."""

from __future__ import annotations


def format_summary(summary: dict) -> str:
    lines = ["", "=" * 72, "mindrlhf-flow pipeline summary", "=" * 72]
    lines.append("stages: " + ", ".join(f"{k}={v}" for k, v in summary.get("states", {}).items()))
    if summary.get("peak_rss_gb"):
        lines.append(
            "peak RSS (GB): " + ", ".join(f"{k}={v}" for k, v in summary["peak_rss_gb"].items())
        )
    sft = summary.get("sft")
    if sft:
        lines.append(
            f"SFT checkpoint {sft['checkpoint'][:16]}  held-out loss "
            f"{sft['heldout_loss_before']:.3f} -> {sft['heldout_loss_after']:.3f}"
        )
        curve = sft.get("loss_curve") or []
        if curve:
            lines.append("SFT train loss by step: " + "  ".join(f"{s}:{v:.2f}" for s, v in curve))
        for s in sft.get("samples", []):
            lines.append(f"  sample  {s['prompt']!r} -> {s['response']!r}")
    for key, label in (
        ("import", "import"),
        ("rm", "RM"),
        ("ppo", "PPO"),
        ("grpo", "GRPO"),
        ("dpo", "DPO"),
        ("online_dpo", "online DPO"),
    ):
        part = summary.get(key)
        if part:
            figs = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in part.items()
                if k not in ("checkpoint", "samples", "history", "pair_datasets")
            )
            lines.append(f"{label}: checkpoint {str(part.get('checkpoint', ''))[:16]}  {figs}")
    lines.append(
        f"artifacts: {summary.get('store_root', 'artifacts')}/objects/<id> (manifest.json lists "
        "parents)"
    )
    lines.append("=" * 72)
    return "\n".join(lines)
