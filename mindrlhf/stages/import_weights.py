"""Import stage: ``python -m mindrlhf.stages.import_weights --spec S --out O``.

Reads the pretrained weights ``model.init`` names (a Hugging Face directory, a GGUF file, the
pinned SmolLM2 GGUF, a Pangu-alpha MindSpore checkpoint; see models/sources.py), checks they are
exactly the model section's model (which the config loader derived from the same source), checks
our forward pass against a NumPy reference on a fixed prompt, and writes the weights as a
checkpoint artifact that SFT starts from. The manifest records the source files by sha256 and
size, so lineage starts at the user's files, and the same bytes reached another way (an alias,
another path) are the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.schema import DataError
from ..models import sources
from ..models.decoder import CausalLM, load_state_dict
from ..models.gguf_import import numpy_forward
from .common import StageContext, model_meta, stage_main

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def tokenizer_files(cfg) -> dict[str, bytes]:
    """The tokenizer's files, kept with the imported weights so an export is a complete model
    directory: a Hugging Face directory's own, or tokenizer.json / tokenizer_config.json written
    from a GGUF file's vocabulary and chat template."""
    from ..data.tokenizer import load_tokenizer

    if cfg.tokenizer.kind == "hf":
        d = Path(cfg.tokenizer.path)
        return {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    if cfg.tokenizer.kind in ("gguf", "smollm2"):
        tok = load_tokenizer(cfg.tokenizer)
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tok.specials["eos_token"],
            "bos_token": tok.specials["bos_token"] or None,
            "pad_token": tok.specials["pad_token"],
            "chat_template": tok.chat_template,
        }
        return {
            "tokenizer.json": tok.impl.to_str().encode(),
            "tokenizer_config.json": json.dumps(conf).encode(),
        }
    return {}


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg = ctx.cfg
    src = sources.parse(cfg.model.init)
    meta_model = model_meta(cfg)
    model = CausalLM(cfg.model, seed=0)
    try:
        derived, tensors, files = sources.load_weights(src, cfg.model.n_heads)
        sources.merge_model_section(
            {k: v for k, v in meta_model.items() if k in sources.DERIVED}, derived, src.spec
        )
        load_state_dict(model, tensors, source=src.spec)  # every tensor, by name and shape
    except (ValueError, KeyError) as e:  # a weight file that is not the model it claims to be
        raise DataError(str(e.args[0] if isinstance(e, KeyError) else e)) from None
    ids = [int(i) % cfg.model.vocab_size for i in (1, 17, 331, 4001, 23, 5, 9000, 2)]
    ours = model(Tensor(np.array([ids], np.int32)), Tensor(np.ones((1, len(ids)), np.int32)))[
        0
    ].asnumpy()[0]
    diff = None
    if cfg.model.family == "llama":
        diff = float(np.abs(ours - numpy_forward(cfg.model, tensors, ids)).max())
        ctx.log(f"logits vs NumPy reference: max abs diff {diff:.2e}")
        if diff > 1e-2:
            raise ValueError(
                f"{src.spec}: our forward pass disagrees with the NumPy reference (max abs diff "
                f"{diff})"
            )
    art = ctx.store.write_checkpoint(
        tensors,
        name=f"{cfg.name}-import",
        meta={
            "stage": "import",
            "source": {"kind": src.kind, "files": files},
            "model": meta_model,
            "reference_max_abs_diff": diff,
        },
        extra_files=tokenizer_files(cfg),
    )
    ctx.finish(
        {"checkpoint": art.id},
        {"reference_max_abs_diff": diff},
        sources=["smollm2"] if src.spec == "gguf:smollm2" else [],
    )


if __name__ == "__main__":
    stage_main("import_weights", run)
