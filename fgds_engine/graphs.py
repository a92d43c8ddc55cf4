"""CUDA-graph capture of the sampler's two step kinds, replayed for every step of every batch.

(a) the unguided step: UNet CFG forward + fused DDIM step; (b) the feedback step: CFG forward, conditional
UNet forward with gradient, decode, classifier preprocessing, classifier, criterion, backward to the latent,
fused step. Each kind is captured once per *key* (kind, batch, latent shape, dtype, memory format, the
conditioning's shapes) with static buffers for every input (x_t, the timestep as a device tensor, alpha-bars,
conditioning, labels, eta noise); a replay copies the new inputs into those buffers and the output is cloned.
Nothing inside a step reads a value back to the host.

``torch.cuda.graph`` capture is used (not ``torch.compile(mode="reduce-overhead")``): autograd under compiled
CUDA graphs has open upstream bugs giving wrong or zero gradients, and the feedback step needs its backward.
The graphed gradient is tested against the eager one on a GPU (tests/test_graphs.py, marked gpu).

All graphs of one sampler share one memory pool (the first capture's, passed to every later capture): the
temporaries of a step live only during its replay, and replays never overlap, so a later capture may reuse
them; every graph's outputs and static inputs stay referenced, so none is ever handed to another. The pool
then holds the largest step's peak, not the sum of every captured batch size's (a unit's smaller last batch
is captured too). ``memory.choose`` still budgets the CFG and feedback pools as a sum: an upper bound.

On a device without CUDA, ``graphs_unavailable`` says why and the sampler runs eagerly with identical results.
The capture mechanism is injectable (``graph_factory``) so the bookkeeping -- keys, static buffers, copies,
replays -- is tested on the CPU with a stand-in that re-runs the captured body over the static buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def graphs_unavailable(device: torch.device) -> str | None:
    """None if CUDA graphs can be captured on ``device``, else the reason."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


class CudaGraph:
    """One captured CUDA graph: ``capture(body, pool)`` warms up on a side stream, then records ``body()``
    allocating from ``pool`` (None: a new one); ``pool`` is then the pool it allocated from."""

    def __init__(self, warmup: int = 2):
        self.graph, self.warmup, self.out, self.pool = None, warmup, None, None

    def capture(self, body: Callable[[], object], pool=None):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = body()
        self.pool = self.graph.pool()
        return self.out

    def replay(self):
        self.graph.replay()
        return self.out


class EagerStandIn:
    """A graph stand-in for the CPU tests: capture runs the body once, replay runs it again over the same
    static buffers -- exactly the data flow of a real replay."""

    def __init__(self):
        self.body, self.out, self.captures, self.replays, self.pool = None, None, 0, 0, None

    def capture(self, body, pool=None):
        self.body, self.captures = body, self.captures + 1
        self.pool = pool if pool is not None else object()  # a token, as CUDAGraph.pool() gives
        self.out = body()
        return self.out

    def replay(self):
        self.replays += 1
        out = self.body()
        for dst, src in zip(_flat(self.out), _flat(out)):
            dst.copy_(src)  # a replay writes into the captured outputs' memory
        return self.out


def _flat(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@dataclass
class _Entry:
    graph: object
    static: dict[str, torch.Tensor]


@dataclass
class StepGraphs:
    """The captured steps of one sampler, keyed by everything their static buffers depend on."""

    graph_factory: Callable[[], object] = CudaGraph
    entries: dict[tuple, _Entry] = field(default_factory=dict)
    pool: object = None  # the memory pool every capture shares (the first capture's)

    def clear(self) -> None:
        """Drop every captured graph and the shared pool (its memory returns to the allocator)."""
        self.entries.clear()
        self.pool = None

    @staticmethod
    def key(kind: str, inputs: dict[str, torch.Tensor | None]) -> tuple:
        """(kind, then per input: name, shape, dtype, device, channels-last) -- None inputs included."""
        parts = [kind]
        for name in sorted(inputs):
            t = inputs[name]
            if t is None:
                parts.append((name, None))
            else:
                cl = (t.dim() == 4 and not t.is_contiguous()
                      and t.is_contiguous(memory_format=torch.channels_last))
                parts.append((name, tuple(t.shape), t.dtype, str(t.device), cl))
        return tuple(parts)

    def run(self, kind: str, inputs: dict[str, torch.Tensor | None],
            body: Callable[[dict[str, torch.Tensor | None]], object]):
        """``body(static_inputs)`` through a graph: captured on the first call of a key, replayed after.

        The returned tensors are clones: the next replay overwrites the graph's outputs.
        """
        k = self.key(kind, inputs)
        entry = self.entries.get(k)
        if entry is None:
            static = {n: None if t is None else t.detach().clone() for n, t in inputs.items()}
            entry = _Entry(self.graph_factory(), static)
            self.entries[k] = entry
            entry.graph.capture(lambda: body(entry.static), pool=self.pool)
            self.pool = entry.graph.pool
            out = entry.graph.replay()  # the capture only records on CUDA: run once with these inputs
        else:
            for n, t in inputs.items():
                if t is not None:
                    entry.static[n].copy_(t)
            out = entry.graph.replay()
        if not isinstance(out, tuple):
            return out.clone()
        cloned = [t.clone() if isinstance(t, torch.Tensor) else t for t in out]
        return out._make(cloned) if hasattr(out, "_make") else tuple(cloned)  # a record stays a record
