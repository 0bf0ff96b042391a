"""A fused RMSNorm for the CPU: one MindSpore AOT custom operator forward, one backward.

MindSpore 2.9's CPU build has no RmsNorm kernel, so ``x * rsqrt(mean(x*x) + eps) * w`` runs as
five broadcasting kernels forward and about twice as many backward -- eagerly one dispatch each.
At SmolLM2's shape (32 x 24 x 576) that is ~11 ms forward and ~30 ms forward + backward per norm,
61 norms a step. ``kernels/rmsnorm.cc`` does each direction in one pass over the rows (sums in
double, every row computed the same way whatever the batch around it); ``ops.Custom`` runs it
eagerly and inside ``mindspore.jit`` graphs, its ``bprop`` the backward kernel.

The source is compiled with the system C++ compiler on first use into the cache directory
(``$MINDRLHF_CACHE/kernels``, named by the source's sha256 and the machine, written to a temp
file and renamed, so concurrent stage processes agree). Where it cannot be used -- not a CPU, no
compiler, a dtype other than float32, or ``MINDRLHF_FUSED_RMSNORM=0`` -- ``decoder.RMSNorm`` runs
the composed expression (:func:`composed`), which the kernel equals to float rounding
(tests/test_fused.py).
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

SOURCE = Path(__file__).with_name("kernels") / "rmsnorm.cc"
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++14"]
log = logging.getLogger(__name__)

_state: dict = {}  # "ops": (forward, backward) Custom ops, or None when unavailable


def _cache_dir() -> Path:
    return Path(os.environ.get("MINDRLHF_CACHE", Path.cwd() / ".cache")) / "kernels"


def library() -> Path:
    """The compiled kernel library, built on first use (see the module docstring)."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(FLAGS).encode() + platform.machine().encode())
    out = _cache_dir() / f"rmsnorm-{tag.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) to build the fused RMSNorm")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".rmsnorm.", suffix=".so")
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
    return os.environ.get("MINDRLHF_FUSED_RMSNORM", "1") != "0"


def _ops():
    """(forward, backward) Custom ops, or None where the kernel cannot run here."""
    if "ops" in _state:
        return _state["ops"]
    _state["ops"] = None
    if ms.get_context("device_target") != "CPU":
        return None
    try:
        lib = str(library())
    except (OSError, RuntimeError) as e:
        log.warning("fused RMSNorm unavailable, using the composed one: %s", e)
        return None
    backward = ops.Custom(
        f"{lib}:RmsNormBackward",
        out_shape=lambda x, w, rstd, dy: (x, w),
        out_dtype=lambda x, w, rstd, dy: (x, w),
        func_type="aot",
    )

    def bprop(x, w, eps, out, dout):
        dx, dw = backward(x, w, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)

    forward = ops.Custom(
        f"{lib}:RmsNormForward",
        out_shape=lambda x, w, eps: (x, x[:-1] + [1]),
        out_dtype=lambda x, w, eps: (x, x),
        func_type="aot",
        bprop=bprop,
    )
    _state["ops"] = (forward, backward)
    return _state["ops"]


def forward_op():
    """The fused RMSNorm forward (a Custom op taking x, weight, eps as a (1,) float32 Tensor and
    returning (y, rstd)), or None where it cannot run here or is switched off. Resolved when a
    model is built, so a compiled graph sees a constant choice."""
    if not enabled():
        return None
    fused = _ops()
    return None if fused is None else fused[0]


def composed(x, weight, eps: float):
    """The same norm as five MindSpore operators (any device, any dtype)."""
    return x * ops.rsqrt(mint.mean(x * x, -1, True) + eps) * weight
