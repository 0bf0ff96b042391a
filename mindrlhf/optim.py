"""The optimizers a stage's Trainer can use (``<stage>.optimizer``).

``adamweightdecay`` (the default): MindSpore's ``nn.AdamWeightDecay``, eps 1e-6. It has no bias
correction: its first steps are several times larger than Adam's at the same learning rate
(3.2x at step 1, 6.6x at step 12, still 3.2x at step 100 for a constant gradient), so a
learning rate tuned with torch's AdamW (TRL, OpenRLHF, verl) is not the same setting here.

``adamw``: torch.optim.AdamW's update (Loshchilov & Hutter 2019, decoupled weight decay, with
Adam's bias correction), eps 1e-8, on the same fused ``AdamWeightDecay`` kernel. That kernel
computes p -= lr' (m / (sqrt(v) + eps') + wd' p) after updating m and v; AdamW's step
p -= lr (m / c1 / (sqrt(v / c2) + eps) + wd p), with c1 = 1 - beta1^t and c2 = 1 - beta2^t, is
the same with lr' = lr sqrt(c2) / c1, eps' = eps sqrt(c2) and wd' = wd c1 / sqrt(c2). The moments
and the step counter are the parent's Parameters under the parent's names, so checkpoints,
resume and the compiled step treat both alike.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

_fused_step = ops.MultitypeFuncGraph("mindrlhf_fused_adamw")


@_fused_step.register(
    "Function",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Tensor",
    "Bool",
)
def _apply(kernel, beta1, beta2, eps, lr, weight_decay, param, m, v, grad, decay):
    wd = weight_decay if decay else weight_decay * 0.0
    kernel(param, m, v, lr, beta1, beta2, eps, wd, ops.cast(grad, param.dtype))
    return True


class AdamW(nn.AdamWeightDecay):
    """torch.optim.AdamW's update on MindSpore's fused AdamWeightDecay kernel (see the module
    docstring); one parameter group, as the Trainer builds it."""

    def __init__(self, params, learning_rate, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(
            params,
            learning_rate=learning_rate,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )
        if self.is_group:
            raise ValueError("AdamW here takes one parameter group")

    @ms.jit(backend="ms_backend")  # one graph when called eagerly, as the parent's
    def construct(self, gradients):
        gradients = self.flatten_gradients(gradients)
        lr = self.get_lr()
        weight_decay = self.get_weight_decay()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        t = ops.cast(self.global_step, ms.float32)  # 1 at the first step
        c1 = 1.0 - ops.pow(self.beta1, t)
        root_c2 = ops.sqrt(1.0 - ops.pow(self.beta2, t))
        return self.hyper_map(
            ops.partial(
                _fused_step,
                self.fused_opt,
                self.beta1,
                self.beta2,
                self.eps * root_c2,
                lr * root_c2 / c1,
                weight_decay * c1 / root_c2,
            ),
            self._parameters,
            self.moments1,
            self.moments2,
            gradients,
            self.decay_flags,
        )


class FusedUpdate:
    """``opt``'s step (either kind above) run eagerly as in-place CPU kernel calls
    (models/kernels/cpu_ops.cc ``AdamWeightDecayInPlaceMany``, two threads), one for the
    parameters that decay and one for those that do not, with the global-norm clipping factor
    folded in, and the gradient norm the eager Trainer reads as one ``SumSquaresMany`` call over
    every gradient (float64 sums): at SmolLM2-135M's 134.5M parameters the update takes ~0.2 s
    against MindSpore's kernel's ~0.5 s, the norm ~0.06 s against the host's float64 copy's
    ~0.14 s, and clipping nothing against one multiply per gradient. (One call per tensor, as
    before 2026-11-29, cost ~0.5 ms of dispatch a call: 544 calls a SmolLM2 step.) The same
    parameters, moments and step counter as ``opt(grads)`` (checkpoints and resume unchanged), the
    same numbers to float rounding (tests/test_optim.py). :func:`fused_update` gives None where
    the kernels do not run (not a CPU, no compiler, ``MINDRLHF_FUSED_KERNELS=0``) or the
    optimizer is one this does not cover (parameter groups, a parallel optimizer)."""

    def __init__(self, opt, kernels: dict):
        self.opt = opt
        self.step_op, self.norm_op = kernels["adamw_in_place_many"], kernels["sum_squares_many"]
        self.bias_corrected = isinstance(opt, AdamW)
        self.beta1, self.beta2 = float(opt.beta1.asnumpy()[0]), float(opt.beta2.asnumpy()[0])
        self.eps = float(opt.eps.asnumpy()[0])

    def grad_norm(self, grads) -> float:
        return float(self.norm_op(*grads).asnumpy()[0] ** 0.5)

    def __call__(self, grads, scale: float = 1.0) -> None:
        """One step on ``grads``, each multiplied by ``scale`` first (clipping)."""
        import numpy as np
        from mindspore import Tensor, ops

        opt = self.opt
        ops.assign_add(opt.global_step, opt.global_step_increase_tensor)
        lr = float(opt.learning_rate.asnumpy())
        w = opt.weight_decay
        wd = float(w.asnumpy()) if hasattr(w, "asnumpy") else float(w)
        eps = self.eps
        if self.bias_corrected:  # the AdamW class's transform (module docstring)
            t = int(opt.global_step.asnumpy()[0])
            c1, root_c2 = 1.0 - self.beta1**t, (1.0 - self.beta2**t) ** 0.5
            lr, eps, wd = lr * root_c2 / c1, eps * root_c2, wd * c1 / root_c2
        groups = {False: [], True: []}  # one kernel call per decay setting
        for p, m, v, g, decay in zip(
            opt._parameters, opt.moments1, opt.moments2, grads, opt.decay_flags
        ):
            # astype copies even to the same dtype (a 113 MB embedding gradient at SmolLM2)
            groups[bool(decay)] += [p, m, v, g if g.dtype == p.dtype else g.astype(p.dtype)]
        for decay, tensors in groups.items():
            if tensors:
                h = np.float32([lr, self.beta1, self.beta2, eps, wd if decay else 0.0, scale])
                self.step_op(Tensor(h), *tensors)


def fused_update(opt) -> FusedUpdate | None:
    """A :class:`FusedUpdate` of ``opt`` where it can run here, else None."""
    from .models import fused

    kernels = fused._ops() if fused.enabled() else None
    if kernels is None or opt.is_group or getattr(opt, "use_parallel", False):
        return None
    if any(p.dtype != ms.float32 for p in opt._parameters):
        return None
    return FusedUpdate(opt, kernels)


def make_optimizer(kind: str, params, lr: float, weight_decay: float):
    """The Trainer's optimizer of ``kind`` (``<stage>.optimizer``)."""
    if kind == "adamw":
        return AdamW(params, learning_rate=lr, weight_decay=weight_decay)
    if kind == "adamweightdecay":
        return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {kind!r}: adamweightdecay or adamw")
