"""Fused CPU kernels of the decoder, RMSNorm and RoPE: each one MindSpore AOT custom operator
forward and one backward; and attention's head transposes, (B, T, heads, D) <-> (B, heads, T, D),
one row copy per (row, head, position) where MindSpore's CPU Transpose crawls.

MindSpore 2.9's CPU build has no RmsNorm kernel, so ``x * rsqrt(mean(x*x) + eps) * w`` runs as
five broadcasting kernels forward and about twice as many backward -- eagerly one dispatch each.
At SmolLM2's shape (32 x 24 x 576) that is ~11 ms forward and ~30 ms forward + backward per norm,
61 norms a step. ``kernels/cpu_ops.cc`` does each direction in one pass over the rows (sums in
double, every row computed the same way whatever the batch around it); ``ops.Custom`` runs it
eagerly and inside ``mindspore.jit`` graphs, its ``bprop`` the backward kernel. RoPE likewise:
``x * cos + rotate_half(x) * sin`` (two broadcasting muls, a permutation matmul and an add, on q
and on k in every layer) as one pass, its backward another. SwiGLU's ``silu(gate) * up`` and
the loss head's log p(token) (``models/head.py``) likewise: one pass each way, and no (rows,
width) intermediates kept for the backward but the inputs -- where the composed SwiGLU keeps its
sigmoid and products, and the head its (rows, vocabulary) log-softmax. Attention,
``softmax(q k^T / sqrt(D) + bias) v``, is one kernel each way too: each query reads only the
keys from its first allowed one to its last (16-key tiles), so a packed row's example reads its
own keys and not the row's, and the backward recomputes the weights from each query's max and
sum, so no (B, heads, T, S) scores or probabilities are kept (a fused softmax alone was dropped
before: eagerly a custom operator's backward holds its input, those scores). Rows are split over
two threads when a call has 2^15 elements or more; a row is computed the same way either side.

The source is compiled with the system C++ compiler on first use into the cache directory
(``$MINDRLHF_CACHE/kernels``, named by the source's sha256, the flags and this CPU's model and
features -- ``-march=native`` -- written to a temp file and renamed, so concurrent stage processes
agree). Where it cannot be used -- not a CPU, no compiler, a dtype other than float32, or
``MINDRLHF_FUSED_KERNELS=0`` -- the decoder runs the composed expressions (:func:`composed`,
``Attention._rope``), which the kernels equal to float rounding (tests/test_fused.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import mindspore as ms
from mindspore import mint, ops

SOURCE = Path(__file__).with_name("kernels") / "cpu_ops.cc"
# -march=native: this CPU's vector units (the library is built per machine, see library());
# -ffp-contract=off: no fused multiply-adds, so every element rounds as the source says;
# -fno-math-errno: lets the compiler call glibc's vector expf (SwiGLU)
FLAGS = [
    "-O3",
    "-shared",
    "-fPIC",
    "-std=c++14",
    "-pthread",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
]
log = logging.getLogger(__name__)

_state: dict = {}  # "ops": {"rms_norm": ..., "rope": ...} Custom ops, or None when unavailable


def _cache_dir() -> Path:
    return Path(os.environ.get("MINDRLHF_CACHE", Path.cwd() / ".cache")) / "kernels"


def _cpu_identity() -> bytes:
    """What -march=native compiles for: the architecture and, on Linux, the CPU's model and
    feature flags, so a cache directory shared by different machines keeps one build each."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            ident += "".join(
                sorted({ln for ln in f if ln.startswith(("model name", "flags", "Features"))})
            )
    except OSError:
        pass
    return ident.encode()


def library() -> Path:
    """The compiled kernel library, built on first use (see the module docstring)."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_identity())
    out = _cache_dir() / f"cpu_ops-{tag.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) to build the fused CPU kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".cpu_ops.", suffix=".so")
    os.close(fd)
    try:
        r = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{r.stderr[-2000:]}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def enabled() -> bool:
    return os.environ.get("MINDRLHF_FUSED_KERNELS", "1") != "0"


def _ops():
    """{"rms_norm": forward, "rope": forward} Custom ops (each with its backward as bprop), or
    None where the kernels cannot run here."""
    if "ops" in _state:
        return _state["ops"]
    _state["ops"] = None
    if ms.get_context("device_target") != "CPU":
        return None
    try:
        lib = str(library())
    except (OSError, RuntimeError) as e:
        log.warning("fused CPU kernels unavailable, using the composed operators: %s", e)
        return None
    norm_backward = ops.Custom(
        f"{lib}:RmsNormBackward",
        out_shape=lambda x, w, rstd, dy: (x, w),
        out_dtype=lambda x, w, rstd, dy: (x, w),
        func_type="aot",
    )

    def norm_bprop(x, w, eps, out, dout):
        dx, dw = norm_backward(x, w, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)

    norm = ops.Custom(
        f"{lib}:RmsNormForward",
        out_shape=lambda x, w, eps: (x, x[:-1] + [1]),
        out_dtype=lambda x, w, eps: (x, x),
        func_type="aot",
        bprop=norm_bprop,
    )
    rope_backward = ops.Custom(
        f"{lib}:RopeBackward",
        out_shape=lambda dy, cos, sin: dy,
        out_dtype=lambda dy, cos, sin: dy,
        func_type="aot",
    )

    def rope_bprop(x, cos, sin, out, dout):
        return rope_backward(dout, cos, sin), ops.zeros_like(cos), ops.zeros_like(sin)

    rope = ops.Custom(
        f"{lib}:RopeForward",
        out_shape=lambda x, cos, sin: x,
        out_dtype=lambda x, cos, sin: x,
        func_type="aot",
        bprop=rope_bprop,
    )

    def swap12(**bprop):
        return ops.Custom(
            f"{lib}:SwapAxes12",
            out_shape=lambda x: [x[0], x[2], x[1], x[3]],
            out_dtype=lambda x: x,
            func_type="aot",
            **bprop,
        )

    swap_back = swap12()

    def swap_bprop(x, out, dout):  # a def: MindSpore parses a bprop, and not a lambda argument
        return (swap_back(dout),)  # the swap is its own inverse

    swap = swap12(bprop=swap_bprop)
    swiglu_backward = ops.Custom(
        f"{lib}:SwigluBackward",
        out_shape=lambda g, u, dh: (g, u),
        out_dtype=lambda g, u, dh: (g, u),
        func_type="aot",
    )

    def swiglu_bprop(g, u, out, dout):
        return swiglu_backward(g, u, dout)

    swiglu = ops.Custom(
        f"{lib}:SwigluForward",
        out_shape=lambda g, u: g,
        out_dtype=lambda g, u: g,
        func_type="aot",
        bprop=swiglu_bprop,
    )
    # the eager optimizer step's (optim.FusedUpdate), every parameter in one call (one per
    # decay setting): no gradients, nothing to differentiate
    adamw_many = ops.Custom(
        f"{lib}:AdamWeightDecayInPlaceMany",
        out_shape=lambda *a: [1],
        out_dtype=lambda *a: ms.float32,
        func_type="aot",
    )
    sum_squares_many = ops.Custom(
        f"{lib}:SumSquaresMany",
        out_shape=lambda *g: [1],
        out_dtype=lambda *g: ms.float64,
        func_type="aot",
    )
    token_logprob_backward = ops.Custom(
        f"{lib}:TokenLogprobBackward",
        out_shape=lambda x, labels, lse, dlp: x,
        out_dtype=lambda x, labels, lse, dlp: x,
        func_type="aot",
    )

    def token_logprob_bprop(x, labels, out, dout):
        return token_logprob_backward(x, labels, out[1], dout[0]), ops.zeros_like(labels)

    token_logprob = ops.Custom(
        f"{lib}:TokenLogprobForward",
        out_shape=lambda x, labels: (labels, labels),
        out_dtype=lambda x, labels: (x, x),
        func_type="aot",
        bprop=token_logprob_bprop,
    )
    attention_backward = ops.Custom(
        f"{lib}:AttentionBackward",
        out_shape=lambda q, k, v, bias, out, stats, dout: (q, k, v),
        out_dtype=lambda q, k, v, bias, out, stats, dout: (q, k, v),
        func_type="aot",
    )

    def attention_bprop(q, k, v, bias, out, dout):
        dq, dk, dv = attention_backward(q, k, v, bias, out[0], out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(bias)

    attention = ops.Custom(
        f"{lib}:AttentionForward",
        out_shape=lambda q, k, v, bias: ([q[0], q[2], q[1], q[3]], q[:3] + [2]),
        out_dtype=lambda q, k, v, bias: (q, q),
        func_type="aot",
        bprop=attention_bprop,
    )
    _state["ops"] = {
        "adamw_in_place_many": adamw_many,
        "attention": attention,
        "sum_squares_many": sum_squares_many,
        "rms_norm": norm,
        "rope": rope,
        "swap12": swap,
        "swiglu": swiglu,
        "token_logprob": token_logprob,
    }
    return _state["ops"]


def forward_op(name: str = "rms_norm"):
    """The fused forward ``name`` -- ``rms_norm`` (x, weight, eps as a (1,) float32 Tensor ->
    (y, rstd)), ``rope`` (x (B, H, T, D), cos, sin (B, 1, T, D) -> y), ``swap12`` (x (A, B, C,
    D) -> (A, C, B, D)), ``swiglu`` (g, u of one shape -> silu(g) * u), ``token_logprob``
    (logits (..., V), int32 labels (...) -> (log p(labels), logsumexp)) or ``attention`` (q (B,
    H, T, D), k, v (B, KV, S, D), bias (B, 1, T, S) -> (out (B, T, H, D), per-query max and
    1 / sum (B, H, T, 2))), float32 -- or None
    where it cannot run here or is switched off. Resolved when a model is built, so a compiled
    graph sees a constant choice."""
    if not enabled():
        return None
    fused = _ops()
    return None if fused is None else fused[name]


def composed(x, weight, eps: float):
    """The same norm as five MindSpore operators (any device, any dtype)."""
    return x * ops.rsqrt(mint.mean(x * x, -1, True) + eps) * weight
