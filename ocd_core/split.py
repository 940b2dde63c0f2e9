"""Split a model at a layer with torch.fx: ``head(x)`` -> the values alive at the layer,
``tail(*values)`` -> the network output, the layer included.

Per-sample overfitting changes only the layer's weight, so everything upstream of it is the
same at every optimisation step: computing the head once and only the tail per step saves the
bulk of the work for a late layer (LeNet5 fc1: the convolutions). Models that fx cannot trace,
or that call the layer more than once, get ``None`` and the callers fall back to full forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass
class Split:
    head: fx.GraphModule  # x -> tuple of live tensors (the layer's input among them)
    tail: fx.GraphModule  # *live tensors -> network output; holds the layer under its own name


class _Tracer(fx.Tracer):
    """fx's tracer, keeping modules that set ``fx_leaf = True`` as one call (their forward then
    decides at run time, e.g. ``layers.MaxPool2x2`` by device)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "fx_leaf", False) or super().is_leaf_module(m, qualname)


def split_model(model: nn.Module, layer: str) -> Split | None:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception:  # noqa: BLE001  data-dependent control flow etc.: not traceable
        return None
    nodes = list(gm.graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return None
    cut = calls[0]
    before, after = nodes[:cut], nodes[cut:]
    after_set = set(after)
    live = [n for n in before if n.op != "output" and any(u in after_set for u in n.users)]
    if any(n.op == "placeholder" for n in live) or not live:
        return None  # the layer reads the raw input: nothing to save

    head_graph, env = fx.Graph(), {}
    for n in before:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(tuple(env[n] for n in live))
    tail_graph, env = fx.Graph(), {}
    for n in live:
        env[n] = tail_graph.placeholder(n.name)
    for n in after:
        env[n] = tail_graph.node_copy(n, lambda a: env[a])
    head, tail = fx.GraphModule(gm, head_graph), fx.GraphModule(gm, tail_graph)
    head.eval(), tail.eval()
    return Split(head, tail)


def check_split(model: nn.Module, split: Split, x: torch.Tensor) -> bool:
    """True when tail(head(x)) reproduces model(x) and the live values are per-sample tensors
    (batch dimension first, so callers may repeat or slice them per sample): checked on x and on
    x with every sample repeated, a guard against an unfaithful trace."""
    with torch.no_grad():
        live = split.head(x)
        if not all(isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] for v in live):
            return False
        x2 = x.repeat_interleave(2, 0)
        return torch.allclose(split.tail(*live), model(x), atol=1e-5, rtol=1e-5) and torch.allclose(
            split.tail(*(v.repeat_interleave(2, 0) for v in live)), model(x2), atol=1e-5, rtol=1e-5
        )
