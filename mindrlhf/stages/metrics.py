"""Per-step metrics of a stage as an Arrow artifact with a PNG plot beside it."""

from __future__ import annotations

import io

import pyarrow as pa


def history_table(history: list[dict]) -> pa.Table:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    return pa.table({k: [h.get(k) for h in history] for k in keys})


def plot_png(history: list[dict], keys: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False
    )
    for ax, k in zip(axes[0], keys):
        pts = [(h["step"], h[k]) for h in history if k in h and h[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        for h in history:  # iterations where the reward-hacking watch fired
            if h.get("hacking_suspected"):
                ax.axvline(h["step"], color="tab:red", alpha=0.5, linestyle="--")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def publish_metrics(ctx, history: list[dict], plot_keys: list[str], parents: list[str]):
    """Write the history as ``<name>-<stage>-metrics`` (data.arrow + plot.png); returns the
    artifact."""
    png = plot_png(history, plot_keys, f"{ctx.cfg.name} {ctx.name}")
    return ctx.store.write_dataset(
        history_table(history),
        name=f"{ctx.cfg.name}-{ctx.name}-metrics",
        parents=parents,
        meta={"stage": ctx.name, "kind": "metrics"},
        extra_files={"plot.png": png},
    )
