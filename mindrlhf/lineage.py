"""The lineage of artifacts as a picture: registry package -> dataset -> SFT -> RM -> PPO / DPO.

One node per artifact (its name, short id and headline figure) and per registry package it was
built from; edges from parents. The many rollout datasets of an RL stage are one node ("12
rollouts"). Rendered as Graphviz ``dot`` text, as JSON, or as a self-contained SVG laid out here
(layers by longest path from the sources, order within a layer by the mean position of parents),
so neither Graphviz nor a browser plugin is needed: the flow publishes it as a Prefect artifact
and ``mindrlhf lineage REF --format svg`` prints the same picture.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

from .data.store import ArtifactStore

HEADLINE = {  # stage -> (metric, label) shown under a checkpoint's name
    "sft": ("heldout_loss_after", "held-out loss"),
    "rm": ("heldout_accuracy", "held-out acc"),
    "ppo": ("heldout_score_ppo", "RM score"),
    "grpo": ("accuracy_grpo", "accuracy"),
    "dpo": ("heldout_reward_accuracy_dpo", "reward acc"),
    "online_dpo": ("heldout_score_after", "RM score"),
    "import": ("reference_max_abs_diff", "ref diff"),
}
COLORS = {
    "dataset": "#e8f1fb",
    "checkpoint": "#fdf0dc",
    "package": "#eaf6e6",
    "rollouts": "#f3e9f9",
    "file": "#f1f1f1",
}


@dataclass
class Node:
    key: str
    kind: str  # dataset | checkpoint | package | file | rollouts
    title: str
    detail: str
    parents: list[str] = field(default_factory=list)


def _headline(a) -> str:
    if a.kind == "dataset":
        rows = a.manifest.get("num_rows")
        return f"{rows} rows" if rows is not None else ""
    metric, label = HEADLINE.get(a.meta.get("stage", ""), (None, None))
    v = (a.meta.get("metrics") or {}).get(metric, a.meta.get(metric)) if metric else None
    return f"{label} {v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def graph(store: ArtifactStore, refs: list[str]) -> dict[str, Node]:
    """The nodes of every artifact the refs descend from, rollouts of one stage merged."""
    nodes: dict[str, Node] = {}
    rollout_groups: dict[str, str] = {}
    for ref in refs:
        for a in store.lineage(ref):
            if a.id in nodes or a.id in rollout_groups:
                continue
            if "-rollout-" in a.name:
                group = re.sub(r"-rollout-\d+$", "-rollouts", a.name)
                rollout_groups[a.id] = group
                n = nodes.setdefault(group, Node(group, "rollouts", group, "", []))
                n.parents = sorted(set(n.parents) | set(a.parents))
                n.detail = f"{sum(1 for g in rollout_groups.values() if g == group)} rollouts"
                continue
            parents = list(a.parents)
            for f in (a.meta.get("source") or {}).get("files", []):  # the user's own files
                fkey = f"file:{f['sha256']}"
                name = f.get("name", "weights")
                nodes.setdefault(
                    fkey,
                    Node(fkey, "file", f"{name}@{f['sha256'][:8]}", f"{f.get('bytes', 0)} bytes"),
                )
                parents.append(fkey)
            for key, info in (a.meta.get("sources") or {}).items():
                pkg = f"pkg:{info.get('spec', key)}"
                nodes.setdefault(
                    pkg, Node(pkg, "package", info.get("spec", key), info.get("license", ""), [])
                )
                parents.append(pkg)
            title = f"{a.name}@{a.id[:8]}"
            nodes[a.id] = Node(a.id, a.kind, title, _headline(a), parents)
    for n in nodes.values():  # parents that are grouped rollouts point at the group
        n.parents = sorted(
            {rollout_groups.get(p, p) for p in n.parents if rollout_groups.get(p, p) in nodes}
        )
    for n in nodes.values():
        n.parents = [p for p in n.parents if p != n.key]
    return nodes


def to_dot(nodes: dict[str, Node]) -> str:
    lines = [
        "digraph lineage {",
        "  rankdir=LR; node [shape=box, style=filled, fontname=Helvetica];",
    ]
    for n in nodes.values():
        label = html.escape(n.title) + (f"\\n{html.escape(n.detail)}" if n.detail else "")
        lines.append(f'  "{n.key}" [label="{label}", fillcolor="{COLORS[n.kind]}"];')
    for n in nodes.values():
        lines += [f'  "{p}" -> "{n.key}";' for p in n.parents]
    return "\n".join(lines + ["}"]) + "\n"


def to_json(nodes: dict[str, Node]) -> str:
    return json.dumps([n.__dict__ for n in nodes.values()], indent=1)


def layout(nodes: dict[str, Node]) -> tuple[dict[str, tuple[int, int]], int]:
    """(layer, slot) of each node: layer = longest path from a source; slots ordered by the mean
    slot of the parents (two sweeps), so edges mostly run straight."""
    layer: dict[str, int] = {}

    def depth(k: str, seen=()) -> int:
        if k not in layer:
            ps = [p for p in nodes[k].parents if p not in seen]
            layer[k] = 1 + max((depth(p, (*seen, k)) for p in ps), default=-1)
        return layer[k]

    for k in nodes:
        depth(k)
    layers: dict[int, list[str]] = {}
    for k in sorted(nodes, key=lambda k: (layer[k], nodes[k].title)):
        layers.setdefault(layer[k], []).append(k)
    pos = {k: (layer[k], i) for lk in layers.values() for i, k in enumerate(lk)}
    for _ in range(2):
        for li in sorted(layers)[1:]:
            ks = layers[li]

            def bary(k):
                ps = [pos[p][1] for p in nodes[k].parents if p in pos]
                return sum(ps) / len(ps) if ps else pos[k][1]

            ks.sort(key=bary)
            for i, k in enumerate(ks):
                pos[k] = (li, i)
    return pos, max((len(v) for v in layers.values()), default=1)


def to_svg(nodes: dict[str, Node], title: str = "lineage") -> str:
    pos, tallest = layout(nodes)
    w, h, gx, gy = 230, 46, 60, 18
    width = (max((p[0] for p in pos.values()), default=0) + 1) * (w + gx) + gx
    height = tallest * (h + gy) + gy + 30

    def xy(k):
        li, si = pos[k]
        return gx + li * (w + gx), 30 + gy + si * (h + gy)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{gx}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" '
        'orient="auto"><path d="M0,0L10,5L0,10z" fill="#777"/></marker></defs>',
    ]
    for n in nodes.values():
        x2, y2 = xy(n.key)
        for p in n.parents:
            x1, y1 = xy(p)
            x1, y1, y2c = x1 + w, y1 + h / 2, y2 + h / 2
            mid = (x1 + x2) / 2
            out.append(
                f'<path d="M{x1},{y1} C{mid},{y1} {mid},{y2c} {x2},{y2c}" fill="none" '
                f'stroke="#999" stroke-width="1.2" marker-end="url(#a)"/>'
            )
    for n in nodes.values():
        x, y = xy(n.key)
        t = n.title if len(n.title) <= 34 else n.title[:33] + "…"
        out.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{COLORS[n.kind]}" '
            f'stroke="#555"/>'
        )
        out.append(f'<text x="{x + 8}" y="{y + 19}" font-weight="bold">{html.escape(t)}</text>')
        out.append(
            f'<text x="{x + 8}" y="{y + 36}" fill="#333">{html.escape(n.kind)}'
            f"{'  ·  ' + html.escape(n.detail) if n.detail else ''}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
