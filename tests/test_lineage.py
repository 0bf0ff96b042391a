"""The lineage picture: one node per artifact, registry package and user file, edges from
parents, an RL stage's rollouts as one node, the same graph as dot, JSON and a self-contained
SVG (the flow publishes the SVG; mindrlhf lineage --format prints each)."""

import json

import numpy as np
import pyarrow as pa

from mindrlhf.cli import main
from mindrlhf.lineage import graph, to_dot, to_json, to_svg


def small_store(store):
    pin = {"vader-sdist": {"spec": "vaderSentiment==3.3.2", "sha256": "ab" * 32, "license": "MIT"}}
    text = store.write_dataset(pa.table({"a": [1, 2]}), name="r-sft_train", meta={"sources": pin})
    user = store.write_dataset(
        pa.table({"a": [3]}),
        name="u-pairs_train",
        meta={"source": {"files": [{"name": "prefs.parquet", "sha256": "cd" * 32, "bytes": 9}]}},
    )
    sft = store.write_checkpoint(
        {"w": np.ones(2, np.float32)},
        name="t-sft",
        parents=[text.id],
        meta={"stage": "sft", "metrics": {"heldout_loss_after": 4.25}},
    )
    rolls = [
        store.write_dataset(pa.table({"a": [i]}), name=f"t-ppo-rollout-{i}", parents=[sft.id])
        for i in range(3)
    ]
    metrics = store.write_dataset(
        pa.table({"a": [0]}), name="t-ppo-metrics", parents=[r.id for r in rolls]
    )
    ppo = store.write_checkpoint(
        {"w": np.zeros(2, np.float32)},
        name="t-ppo",
        parents=[sft.id, user.id, metrics.id],
        meta={"stage": "ppo", "metrics": {"heldout_score_ppo": 1.5}},
    )
    return text, user, sft, metrics, ppo


def test_graph_nodes_edges_and_renderings(store, tmp_path, capsys):
    text, user, sft, metrics, ppo = small_store(store)
    nodes = graph(store, [ppo.id])
    kinds = sorted(n.kind for n in nodes.values())
    assert kinds == [
        "checkpoint",
        "checkpoint",
        "dataset",
        "dataset",
        "dataset",
        "file",
        "package",
        "rollouts",
    ]
    rollouts = nodes["t-ppo-rollouts"]
    assert rollouts.detail == "3 rollouts" and rollouts.parents == [sft.id]
    assert nodes[metrics.id].parents == ["t-ppo-rollouts"]
    assert set(nodes[ppo.id].parents) == {sft.id, user.id, metrics.id}
    assert nodes[text.id].parents == ["pkg:vaderSentiment==3.3.2"]
    assert nodes[user.id].parents == [f"file:{'cd' * 32}"]
    assert nodes[sft.id].detail == "held-out loss 4.25" and nodes[ppo.id].detail == "RM score 1.5"
    dot = to_dot(nodes)
    assert f'"{sft.id}" -> "{ppo.id}";' in dot and '"pkg:vaderSentiment==3.3.2" -> ' in dot
    assert {n["key"] for n in json.loads(to_json(nodes))} == set(nodes)
    svg = to_svg(nodes)
    assert (
        svg.startswith("<svg") and svg.count("<rect") == len(nodes) + 1
    )  # a box each and the background
    assert svg.count('stroke="#999"') == sum(len(n.parents) for n in nodes.values())  # an edge each
    assert main(["lineage", "t-ppo", "--store", str(store.root), "--format", "dot"]) == 0
    assert capsys.readouterr().out == dot
