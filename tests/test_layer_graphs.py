"""Layer graphs (``<stage>.layer_graphs``, models/decoder.py ``Transformer.use_layer_graphs``):
eager passes that run each decoder layer as one compiled graph taking the layer's weights as
inputs. The same model with and without them gives the same logits, KV cache, gradients and
greedy generations -- for each family and weight layout (GQA, q/k norms, q/k/v biases, GPT-2
biases and LayerNorms, Pangu-alpha's top query layer, packed rows), with trained-looking random
weights so a weight read from the wrong slot shows; one graph serves every layer; inside a whole
compiled step they are the same too; a stage takes the setting from its section."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from conftest import randomize, tiny_model_cfg
from mindrlhf.config import GenerationConfig, load_config
from mindrlhf.models.decoder import CausalLM, ScalarHeadModel
from mindrlhf.models.generation import generate, left_pad

FAMILIES = {
    # grouped kv heads, per-head q/k norms, q/k/v biases, an untied head: every slot of weights()
    "llama-qwen3": dict(
        family="llama", n_layers=3, qk_norm=True, qkv_bias=True, tie_embeddings=False
    ),
    "llama": dict(family="llama", n_layers=3),
    "gpt2": dict(family="gpt2", n_layers=3),
    "pangualpha": dict(family="pangualpha", n_layers=3),
}


def passes(model, ids, mask, segments=None):
    """Logits, the KV cache and the gradient of every parameter for a loss that reads every
    position, eagerly."""

    def loss(ids, mask):
        logits, _ = model(ids, mask, segments=segments)
        return (
            ops.log_softmax(logits, -1)[:, :, 3]
            * Tensor(np.linspace(0.5, 2.0, ids.shape[1], dtype=np.float32))
        ).sum()

    logits, presents = model(ids, mask, segments=segments)
    _, grads = ms.value_and_grad(loss, None, model.trainable_params())(ids, mask)
    kv = [t.asnumpy() for p in presents for t in p]
    return logits.asnumpy(), kv, [g.asnumpy() for g in grads]


def phases(name: str) -> int:
    """How many graphs MindSpore has compiled from functions called ``name``."""
    from mindspore.graph import api

    return sum(f".{name}." in p or p.startswith(name) for p in api.ms_compile_cache)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_graphs_give_the_eager_model_exactly(family):
    """At a span of 2 the 3 layers run as two graph calls, of 2 layers and of 1: each layer's
    weights, cache and gradients must come from its own slot of a span's inputs and outputs.
    (Pangu-alpha's 2 blocks are one span.)"""
    cfg = tiny_model_cfg(**FAMILIES[family])
    model = CausalLM(cfg, seed=3)
    randomize(model, seed=4, qk_scale=3.0)
    r = np.random.default_rng(1)
    ids = Tensor(r.integers(1, cfg.vocab_size, (3, 11)).astype(np.int32))
    m = np.ones((3, 11), np.int32)
    m[1, :4] = 0  # a left-padded row
    mask = Tensor(m)
    model.set_train(True)
    eager = passes(model, ids, mask)
    model.model.use_layer_graphs(span=2)
    n = len(model.model.layers)  # Pangu-alpha: 2 blocks and its top query layer
    assert model.model._spans == [(0, 2), (2, 3)][: n - 1]
    graphs = passes(model, ids, mask)
    np.testing.assert_allclose(graphs[0], eager[0], rtol=1e-5, atol=1e-5)
    assert len(graphs[1]) == len(eager[1]) == 2 * cfg.n_layers
    for a, b in zip(graphs[1], eager[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    scale = max(np.abs(g).max() for g in eager[2])
    for (name, _), a, b in zip(model.parameters_and_names(), graphs[2], eager[2]):
        if name.endswith("k_proj.bias") and not cfg.qk_norm:
            # zero but for rounding (softmax ignores a per-query shift): both runs' rounding
            # noise, small against the other gradients
            assert max(np.abs(a).max(), np.abs(b).max()) < 1e-5 * scale, name
            continue
        tol = max(1e-4 * np.abs(b).max(), 1e-6)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=tol, err_msg=name)
    # out of training mode the same spans, each output read before the next: the same logits and
    # cache, the same response logits through a shared prompt's cache (rows 0-1 and 2-3 share
    # their first 6 columns) and the same greedy tokens (prompt pass in graphs, decode eager)
    model.set_train(False)
    rows = np.asarray(ids)[[0, 0, 1, 1]]
    rows[1, 6:] = rows[2, 6:]
    rows[3, 6:] = rows[0, 6:]
    sids, smask = Tensor(rows), Tensor(m[[0, 0, 1, 1]])
    pid, pmask = left_pad([[5, 9, 2, 7], [3, 8]], 0)
    gen = GenerationConfig(max_new_tokens=8, do_sample=False)

    def forwards():
        logits, presents = model(ids, mask)
        return [
            logits.asnumpy(),
            *[t.asnumpy() for p in presents for t in p],
            model.response_logits(sids, smask, 6, share_prompts=True).asnumpy(),
            generate(model, pid, pmask, gen, -1, 0, compiled=False).sequences,
        ]

    with_graphs = forwards()
    model.model.use_layer_graphs(False)
    for a, b in zip(with_graphs, forwards(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_decoding_runs_the_layers_as_decode_span_graphs(family):
    """With layer graphs, compiled decoding (a fixed-size cache) runs each one-token step eagerly,
    every span of layers one shared decode graph that takes the span's caches and returns new
    ones, written back into the cache (generation._step_graph), where it compiled a graph of
    the whole model: the same greedy tokens and the same log-probs of them, with no whole-model
    step graph compiled. A cache written back to the wrong layer or not at all shows from the
    second new token on."""
    cfg = tiny_model_cfg(**FAMILIES[family])
    model = CausalLM(cfg, seed=3)
    randomize(model, seed=4, qk_scale=3.0)
    pid, pmask = left_pad([[5, 9, 2, 7], [3, 8], [4, 4, 6, 1, 2]], 0)
    gen = GenerationConfig(max_new_tokens=8, do_sample=False)

    def run():
        return generate(model, pid, pmask, gen, -1, 0, compiled=True, logprobs=True)

    whole = run()
    model.model.use_layer_graphs(span=2)
    steps, spans = phases("step"), phases("layer_graph_decode")
    with_spans = run()
    assert phases("step") == steps and phases("layer_graph_decode") > spans
    np.testing.assert_array_equal(with_spans.sequences, whole.sequences)
    np.testing.assert_allclose(with_spans.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)
    model.model.use_layer_graphs(False)
    np.testing.assert_array_equal(run().sequences, whole.sequences)


def test_packed_rows_and_a_scalar_head_the_same_through_layer_graphs():
    cfg = tiny_model_cfg("llama", n_layers=2, qkv_bias=True)
    critic = ScalarHeadModel(cfg, seed=2)
    randomize(critic, seed=6)
    r = np.random.default_rng(2)
    ids = Tensor(r.integers(1, cfg.vocab_size, (2, 11)).astype(np.int32))
    mask = Tensor(np.ones((2, 11), np.int32))
    seg = Tensor(np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 7 + [2] * 4], np.int32))

    def run():
        def loss(ids, mask):
            h, _ = critic.model(ids, mask, segments=seg)
            return (critic.score(h)[..., 0] ** 2).sum()

        v, g = ms.value_and_grad(loss, None, critic.trainable_params())(ids, mask)
        return float(v.asnumpy()), [x.asnumpy() for x in g], critic(ids, mask).asnumpy()

    critic.set_train(True)
    eager = run()
    critic.model.use_layer_graphs()
    graphs = run()
    assert graphs[0] == pytest.approx(eager[0], rel=1e-5)
    np.testing.assert_allclose(graphs[2], eager[2], rtol=1e-5, atol=1e-5)
    for a, b in zip(graphs[1], eager[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_one_graph_serves_every_layer(monkeypatch):
    """The layers' weights are the graph's inputs, so a 4-layer model cut into spans of 2 layers
    compiles one graph for a shape, which both spans call (a Parameter argument would key a
    graph per span), and again only for a new shape -- lengths padded to a multiple of
    LAYER_PAD (8), so 9 and 12 tokens are one shape (16) and 17 another (24), with outputs at
    the real length. Out of training mode (scoring, generation, evaluation) the same spans run,
    so a shape met in training compiles nothing more, a new one one graph, and a one-token
    decode step after a cache none. Without padding (LAYER_PAD 1) each length is its own
    shape."""
    from mindrlhf.models import decoder

    cfg = tiny_model_cfg("llama", n_layers=4, d_model=48, n_heads=6, n_kv_heads=3)
    model = CausalLM(cfg, seed=0)
    model.model.use_layer_graphs(span=3)  # cut as evenly as can be: 2 + 2, not 3 + 1
    assert model.model._spans == [(0, 2), (2, 4)]

    def run(t):
        logits, presents = model(
            Tensor(np.ones((2, t), np.int32)), Tensor(np.ones((2, t), np.int32))
        )
        assert logits.shape == (2, t, cfg.vocab_size)
        assert all(k.shape[2] == v.shape[2] == t for k, v in presents)

    model.set_train(True)
    before = phases("layer_graph")
    for t in (9, 9, 12):
        run(t)
    assert phases("layer_graph") - before == 1
    run(17)
    assert phases("layer_graph") - before == 2
    model.set_train(False)
    for t in (9, 15, 9, 16):
        run(t)
    assert phases("layer_graph") - before == 2  # 16: the training graph
    run(33)  # 40: no width run yet is as wide
    assert phases("layer_graph") - before == 3
    pid, pmask = left_pad([[5, 9, 2, 7], [3, 8]], 0)
    gen = GenerationConfig(max_new_tokens=5, do_sample=False)
    past = phases("layer_graph_past")
    # a (2, 4 -> 8) prompt pass at 16, run already one LAYER_PAD step wider; then eager
    generate(model, pid, pmask, gen, -1, 0, compiled=False)
    assert (phases("layer_graph") - before, phases("layer_graph_past") - past) == (3, 0)
    monkeypatch.setattr(decoder, "LAYER_PAD", 1)
    for t in (10, 11, 10):
        run(t)
    assert phases("layer_graph") - before == 5


def test_a_block_takes_a_compiled_width_up_to_an_eighth_wider():
    """A block runs at a width the layer graphs have already run (same rows, same cache) when
    it is at most an eighth, and at least one LAYER_PAD step, wider than its own padded length,
    instead of compiling its own (decoder._graph_width); wider than that, or at another row
    count, it compiles. At the wider width the logits, cache and gradients are the eager
    model's, the padding (past LAYER_PAD) unseen by every real position."""
    from mindrlhf.models import decoder

    cfg = tiny_model_cfg("llama", n_layers=2, d_model=48, n_heads=6, n_kv_heads=3, max_seq_len=160)
    model = CausalLM(cfg, seed=1)
    randomize(model, seed=2, qk_scale=3.0)
    model.set_train(True)
    decoder.release_layer_graphs()
    model.model.use_layer_graphs(span=2)
    r = np.random.default_rng(3)

    def batch(rows, t):
        ids = r.integers(1, cfg.vocab_size, (rows, t)).astype(np.int32)
        m = np.ones((rows, t), np.int32)
        m[0, : t // 3] = 0  # a left-padded row
        return Tensor(ids), Tensor(m)

    def widths(rows):  # the widths run at, and how many passes (two a call of passes())
        key = (*model.model._width_key, rows, 0)
        return decoder.layer_graph_widths().get(key, {})

    before = phases("layer_graph")
    passes(model, *batch(2, 120))  # 120
    assert (
        widths(2) == {120: 2} and phases("layer_graph") - before == 2
    )  # a forward and one under a gradient
    ids, mask = batch(2, 105)  # its own 112: 120 is within an eighth (14), runs there
    graphs = passes(model, ids, mask)
    assert widths(2) == {120: 4} and phases("layer_graph") - before == 2
    model.model.use_layer_graphs(False)
    eager = passes(model, ids, mask)
    model.model.use_layer_graphs(span=2)
    np.testing.assert_allclose(graphs[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(graphs[1], eager[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(graphs[2], eager[2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-4 * np.abs(b).max(), 1e-6))
    passes(model, *batch(2, 100))  # its own 104: 120 is 16 wider, more than 13: compiles 104
    assert widths(2) == {120: 4, 104: 2} and phases("layer_graph") - before == 4
    passes(model, *batch(3, 105))  # three rows: another shape
    assert widths(3) == {112: 2} and phases("layer_graph") - before == 6
    assert decoder.release_layer_graphs() >= 3 and decoder.layer_graph_widths() == {}


def test_layer_graphs_read_the_weights_in_place():
    """Each call passes the layers' weights to the graph as views of the Parameters' own storage:
    ``Parameter.value()`` copies (an Identity op), and the graph held the copies until its next
    call -- at SmolLM2's shape 425 MB a forward, which took its pool's peak from 83 to 489 MB and
    left each graph shape's copies resident. In training mode under a gradient, out of it, and
    through a cache (a shared prompt's responses), every weight argument's data pointer is one of
    the model's Parameters'."""
    cfg = tiny_model_cfg("llama", n_layers=4, d_model=48, n_heads=6, n_kv_heads=3)
    model = CausalLM(cfg, seed=0)
    model.model.use_layer_graphs(span=2)
    own = {p.data_ptr() for p in model.trainable_params()}
    nw = len(model.model.layers[0].weights())
    seen = []

    def recording(fn, n_kv):
        def call(x, bias, cos, sin, *args):
            w = args[n_kv(args) :]
            seen.append([a.data_ptr() for a in w])
            return fn(x, bias, cos, sin, *args)

        return call

    inner = model.model
    object.__setattr__(inner, "layer_graphs", recording(inner.layer_graphs, lambda a: 0))
    object.__setattr__(
        inner,
        "_layer_graph_past",
        recording(inner._layer_graph_past, lambda a: 2 * (len(a) // (nw + 2))),
    )
    ids = Tensor(np.arange(2, 26, dtype=np.int32).reshape(2, 12))
    mask = Tensor(np.ones((2, 12), np.int32))
    model.set_train(True)
    ms.value_and_grad(lambda i, m: model(i, m)[0].sum(), None, model.trainable_params())(ids, mask)
    model.set_train(False)
    model(ids, mask)
    rows = Tensor(np.asarray(ids)[[0, 0]])
    model.response_logits(rows, mask, 6, share_prompts=True)
    assert [len(w) for w in seen] == [2 * nw] * 8  # two spans each: training, eval, prompt, cache
    assert all(ptr in own for w in seen for ptr in w)


def test_models_of_one_architecture_share_the_graphs():
    """A policy and its reference (one config) share the layer-graph functions: the second model
    compiles nothing for a shape the first met, and runs its own weights through them exactly. A
    model whose weights have the same shapes but split into other heads gets its own."""
    cfg = tiny_model_cfg("llama", n_layers=2, d_model=48, n_heads=6, n_kv_heads=2)
    other = tiny_model_cfg("llama", n_layers=2, d_model=48, n_heads=3, n_kv_heads=1)
    r = np.random.default_rng(5)
    ids = Tensor(r.integers(1, cfg.vocab_size, (2, 7)).astype(np.int32))
    mask = Tensor(np.ones((2, 7), np.int32))
    models = [CausalLM(c, seed=s) for s, c in enumerate((cfg, cfg, other))]
    eager = []
    for s, m in enumerate(models):
        randomize(m, seed=10 + s, qk_scale=3.0)
        m.set_train(False)
        eager.append(m(ids, mask)[0].asnumpy())
        m.model.use_layer_graphs()
    a, b, c = models
    a(ids, mask)
    before = phases("layer_graph")
    outs = [m(ids, mask)[0].asnumpy() for m in (b, c)]
    assert phases("layer_graph") - before == 1  # c's, not b's
    assert b.model.layer_graphs is a.model.layer_graphs is not c.model.layer_graphs
    for out, ref in zip(outs, eager[1:], strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def nll_of(model):
    def loss(ids, mask):
        logits, _ = model(ids, mask)
        nll = -ops.log_softmax(logits, -1)[:, :, 5].mean()
        return nll, nll

    return loss


def test_layer_graphs_inside_a_compiled_step_are_the_same():
    """A whole-step graph (Trainer with compiled: true) calling a model whose layers are graphs
    inlines them: the same losses and weights as without."""
    from mindrlhf.config import OptimConfig
    from mindrlhf.models.decoder import state_dict
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    cfg = tiny_model_cfg("llama", n_layers=2, qk_norm=True)
    ids = Tensor(np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 9)).astype(np.int32))
    mask = Tensor(np.ones((2, 9), np.int32))
    out = []
    for on in (False, True):
        model = CausalLM(cfg, seed=1)
        randomize(model, seed=2)
        model.model.use_layer_graphs(on)
        model.set_train(True)

        t = Trainer(model.trainable_params(), nll_of(model), OptimConfig(lr=1e-2), Dist(), 3)
        losses = [t.step(ids, mask)[0] for _ in range(3)]
        out.append((losses, state_dict(model)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    for k, v in out[0][1].items():
        np.testing.assert_allclose(out[1][1][k], v, rtol=1e-4, atol=1e-5, err_msg=k)


COMPILED_SCORING = """
import numpy as np, mindspore as ms
from mindspore import Tensor
from conftest import randomize, tiny_model_cfg
from mindrlhf.runtime import init_runtime
init_runtime("CPU")
from mindrlhf.models.decoder import CausalLM, in_graph

cfg = tiny_model_cfg("llama", n_layers=4)
model = CausalLM(cfg, seed=0)
randomize(model, seed=1, qk_scale=3.0)
model.model.use_layer_graphs(span=2)
model.set_train(False)
ids = Tensor(np.random.default_rng(2).integers(1, cfg.vocab_size, (2, 9)).astype(np.int32))
mask = Tensor(np.ones((2, 9), np.int32))
eager = model(ids, mask)[0].asnumpy()


def scores(s, m):
    return model(s, m)[0]


np.testing.assert_allclose(ms.jit(scores)(ids, mask).asnumpy(), eager, rtol=1e-5, atol=1e-6)
assert in_graph() is False
print("same logits")
"""


def test_a_layer_graph_model_compiles_into_a_graph_out_of_training_mode(tmp_path):
    """Out of training mode ``construct`` reads each span's output on the host between graph
    calls, which a graph cannot do: parsed into one (a compiled scoring pass), the read must drop
    out (``decoder.in_graph``), and the graph gives the eager logits. In a child process: a graph
    that fails to compile leaves MindSpore aborting at exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    script = tmp_path / "compiled_scoring.py"  # a graph is parsed from a file's source
    script.write_text(COMPILED_SCORING)
    p = subprocess.run(
        [sys.executable, str(script)],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=300,
        # this checkout's mindrlhf (a mutant's copy too), then conftest's helpers
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(here.parent), str(here)))},
    )
    assert p.returncode == 0 and "same logits" in p.stdout, (p.stderr or p.stdout)[-2000:]


def test_layer_graph_batches_are_not_padded():
    """A layer graph compiles in seconds per batch length, so batches keep their own length (the
    ladder's padding cost more than the compiles); a compiled step pads."""
    from mindrlhf.config import OptimConfig

    assert OptimConfig(compiled=False, layer_graphs=True, pad_multiple=8).pad_to == 1
    assert OptimConfig(compiled=True, pad_multiple=8).pad_to == 8


@pytest.mark.parametrize(
    "over, says",
    [
        ({"sft": {"layer_graphs": True}}, "sft.compiled: true"),
        (
            {
                "grpo": {"compiled": False, "layer_graphs": True},
                "model": {"family": "llama", "backend": "mindformers"},
            },
            "grpo.layer_graphs runs our decoder",
        ),
        (
            {
                "dpo": {"compiled": False, "layer_graphs": True},
                "model": {"lora": {"rank": 4}},
                "profile": "smollm2-135m",
            },
            "dpo.layer_graphs: LoRA",
        ),
    ],
)
def test_layer_graphs_refused_where_they_would_not_run(over, says):
    with pytest.raises(ValueError, match=says):
        load_config(over.pop("profile", "demo"), over)


def test_a_stage_takes_layer_graphs_from_its_section(tmp_path):
    """The tiny SFT stage with ``sft.layer_graphs``: its models' layers run as graphs (the stage
    says so) and the loss curve is the eager one's."""
    from conftest import tiny_overrides
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    curves = {}
    for on in (False, True):
        root = tmp_path / str(on)
        cfg = load_config(
            "demo", tiny_overrides(root, compiled=False, layer_graphs=on, log_every=1)
        )
        lines = []
        d = run_stage("prepare", cfg, {}, root, root / "runs" / "prepare", log=lambda s: None)
        out = run_stage(
            "sft",
            cfg,
            {"train": d["outputs"]["sft_train"], "heldout": d["outputs"]["sft_heldout"]},
            root,
            root / "runs" / "sft",
            log=lines.append,
        )
        assert any("layer graphs" in ln for ln in lines) == on
        meta = ArtifactStore(root).get(out["outputs"]["checkpoint"]).meta
        curves[on] = [h["loss"] for h in meta["history"] if "loss" in h]
    assert len(curves[True]) == 6
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)


def test_dpo_with_layer_graphs_releases_each_phases_graphs_and_trains_as_eager(
    tiny_chain, tmp_path
):
    """The tiny DPO stage with ``dpo.layer_graphs``: its held-out evaluation's graphs are
    released before training and the training's before the last evaluation (it says how many),
    and its losses and held-out figures are the eager stage's. In-process, a released shape
    compiles again and gives the same logits."""
    from conftest import tiny_full_overrides
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage
    from mindrlhf.models.decoder import release_layer_graphs

    model = CausalLM(tiny_model_cfg("llama", n_layers=2), seed=0)
    model.model.use_layer_graphs()
    model.set_train(False)
    ids, mask = Tensor(np.ones((2, 9), np.int32)), Tensor(np.ones((2, 9), np.int32))
    first = model(ids, mask)[0].asnumpy()
    assert release_layer_graphs() >= 1 and phases("layer_graph") == 0
    np.testing.assert_array_equal(model(ids, mask)[0].asnumpy(), first)
    assert phases("layer_graph") == 1

    runs = {}
    for on in (False, True):
        over = tiny_full_overrides(tiny_chain.root)
        over["dpo"].update(log_every=1, layer_graphs=on)
        lines = []
        out = run_stage(
            "dpo",
            load_config("demo", over),
            tiny_chain.inputs["dpo"],
            tiny_chain.root,
            tmp_path / str(on),
            log=lines.append,
        )
        released = [ln for ln in lines if "layer graphs: released" in ln]
        meta = ArtifactStore(tiny_chain.root).get(out["outputs"]["checkpoint"]).meta
        runs[on] = (released, meta)
    assert runs[False][0] == []
    counts = [int(ln.split("released ")[1].split()[0]) for ln in runs[True][0]]
    assert len(counts) == 2 and min(counts) >= 1, runs[True][0]
    (_, eager), (_, graphs) = runs[False], runs[True]
    np.testing.assert_allclose(
        [h["loss"] for h in graphs["history"]], [h["loss"] for h in eager["history"]], rtol=1e-4
    )
    for k, v in eager["metrics"].items():
        if isinstance(v, float):
            assert graphs["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
