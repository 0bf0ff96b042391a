"""The compiled graphs a stage process keeps live, bounded in number and in memory.

``mindspore.jit`` compiles a function once per input shape and keeps every graph it compiled for
the life of the process. On CPU a training-step graph holds its own buffers for the whole step --
SmolLM2-135M's SFT step at one batch length costs ~7 GB resident -- so a stage that meets a dozen
batch lengths was killed by the out-of-memory killer while the eager step peaked at 6 GB.

Every compiled call goes through :data:`POOL` with a key naming the graph (its owner and input
shapes). Before compiling another graph, the pool releases the least recently used ones --
through MindSpore's executor, the way ``mindspore.ms_memory_recycle`` does for all of them --
while the process's resident memory plus the expected size of the new graph (the largest of its
family seen so far) would pass ``resources.graph_memory_fraction`` of the host's memory, or the
live graphs would exceed ``resources.max_graphs``. A released graph that is needed again is
compiled again: the same graph, the same numbers.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _compile_cache() -> set:
    from mindspore.graph import api

    return api.ms_compile_cache


def _synchronize(out) -> None:
    """Wait for a graph's outputs (mindspore.runtime.synchronize is not supported on CPU)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if hasattr(out, "asnumpy"):
        out.asnumpy()


def _release_phases(phases: set) -> None:
    from mindspore.graph import api

    if not phases:
        return
    api._cell_graph_executor.del_net_res(None, set(phases))
    if os.getenv("MS_DEV_JIT_PIPELINE") != "0":
        api.JitExecutor_.get_instance().del_net_res(None, set(phases))
    for p in phases:
        api.ms_compile_cache.discard(p)


def _trim() -> None:
    """Hand freed heap pages back to the OS, so the resident figure shows the release."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Graph:
    fn: Callable  # the jitted function the graph belongs to (a new function is a new graph)
    phases: set
    cost: int  # bytes the process grew by when it compiled and first ran
    on_release: Callable[[], None] | None
    family: str


class GraphPool:
    def __init__(self, max_graphs: int = 16, ceiling_bytes: int | None = None):
        self.live: OrderedDict[tuple, _Graph] = OrderedDict()
        self.max_graphs = max_graphs
        self.ceiling = ceiling_bytes  # resident memory above which graphs are released
        self.family_cost: dict[str, int] = {}  # the largest graph seen of each family
        self.compiles: Counter = Counter()
        self.released = 0
        self.log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)

    def configure(
        self, max_graphs: int, ceiling_bytes: int | None, log: Callable[[str], None] | None = None
    ):
        self.max_graphs, self.ceiling = max_graphs, ceiling_bytes
        if log is not None:
            self.log = log

    def live_bytes(self) -> int:
        return sum(g.cost for g in self.live.values())

    def call(
        self, family: str, key: tuple, fn, *args, on_release: Callable[[], None] | None = None
    ):
        """``fn(*args)``, ``fn`` being a ``mindspore.jit`` function whose graph for these inputs is
        named by ``(family, key)``; a new graph is made room for first, then measured."""
        name = (family, key)
        g = self.live.get(name)
        if g is not None and g.fn is fn:
            self.live.move_to_end(name)
            return fn(*args)
        if g is not None:  # the key's owner was replaced (an id reused): the old graph goes
            self.live.move_to_end(name, last=False)
            self.release_oldest()
        self._make_room(self.family_cost.get(family, 0))
        cache = _compile_cache()
        before, r0 = set(cache), rss_bytes()
        out = fn(*args)
        _synchronize(
            out
        )  # a graph runs asynchronously: what it allocates shows once it has finished
        phases = set(cache) - before
        cost = max(rss_bytes() - r0, 0)
        self.family_cost[family] = max(self.family_cost.get(family, 0), cost)
        self.live[name] = _Graph(fn, phases, cost, on_release, family)
        while len(self.live) > 1 and self.ceiling is not None and rss_bytes() > self.ceiling:
            self.release_oldest()  # it was larger than expected: make room behind it
        self.compiles[name] += 1
        if self.compiles[name] == 3:
            self.log(
                f"graph pool: the {family} graph for {key} was compiled 3 times; the memory for "
                "live "
                f"graphs ({self._budget_text()}) holds too few graphs of ~{cost / 2**30:.2f} GB "
                "for this "
                "stage's shapes -- a larger resources.graph_memory_fraction, fewer shapes, or "
                "compiled: false"
            )
        return out

    def _budget_text(self) -> str:
        mem = (
            f"resident memory under {self.ceiling / 2**30:.1f} GB"
            if self.ceiling
            else "no memory limit"
        )
        return f"{mem}, at most {self.max_graphs} graphs"

    def _make_room(self, incoming: int) -> None:
        while self.live and (
            len(self.live) >= self.max_graphs
            or (self.ceiling is not None and rss_bytes() + incoming > self.ceiling)
        ):
            self.release_oldest()

    def release_oldest(self) -> None:
        name, g = self.live.popitem(last=False)
        _release_phases(g.phases)
        if g.on_release is not None:
            g.on_release()
        self.released += 1
        _trim()

    def release_all(self) -> None:
        while self.live:
            self.release_oldest()

    def stats(self) -> dict:
        return {
            "compiled": sum(self.compiles.values()),
            "released": self.released,
            "live": len(self.live),
            "live_gb": round(self.live_bytes() / 2**30, 2),
        }


POOL = GraphPool()


def configure_from(resources, host_bytes: int, log: Callable[[str], None] | None = None) -> None:
    """Bound :data:`POOL` by a config's ``resources`` section on a host with ``host_bytes`` of
    memory."""
    POOL.configure(resources.max_graphs, int(resources.graph_memory_fraction * host_bytes), log)
