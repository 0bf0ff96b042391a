"""Reference log-probs stage: ``python -m mindrlhf.stages.reflogp --spec S --out O``.
Inputs: ``train`` / ``heldout`` pair datasets and ``model`` (the reference checkpoint)."""

from .common import stage_main
from .dpo import run_reflogp

if __name__ == "__main__":
    stage_main("reflogp", run_reflogp)
