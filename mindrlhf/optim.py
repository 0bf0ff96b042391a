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


def make_optimizer(kind: str, params, lr: float, weight_decay: float):
    """The Trainer's optimizer of ``kind`` (``<stage>.optimizer``)."""
    if kind == "adamw":
        return AdamW(params, learning_rate=lr, weight_decay=weight_decay)
    if kind == "adamweightdecay":
        return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {kind!r}: adamweightdecay or adamw")
