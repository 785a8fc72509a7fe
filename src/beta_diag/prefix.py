"""Frozen prefixes: split a model where training begins and compute the prefix's output once.

When every parameter before the first trainable one is frozen (and training applies no random
augmentation), the prefix maps each example to the same features every epoch. ``split`` cuts the
model's torch.fx graph before the first node that touches a trainable parameter, provided one
tensor alone crosses the cut; the suffix shares its modules with the model, so training it
trains the model. Backward never enters the prefix.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from beta_diag import data as data_mod
from beta_diag.data import Dataset, Preprocess
from beta_diag.errors import DataError

MEMORY_BUDGET = 2 * 1024**3  # features beyond this go to a memory-mapped temporary file


@dataclass(frozen=True)
class Split:
    prefix: fx.GraphModule
    suffix: fx.GraphModule
    prefix_name: str  # e.g. "conv1..layer3"

    def on(self, model: nn.Module) -> Split:
        """The same cut over a copy of the model it was traced on, without tracing again: the copy's
        modules run the traced graphs (training the suffix trains the copy)."""
        return Split(
            fx.GraphModule(model, copy.deepcopy(self.prefix.graph)),
            fx.GraphModule(model, copy.deepcopy(self.suffix.graph)),
            self.prefix_name,
        )


def _touches(node: fx.Node, model: nn.Module, chosen: set[str]) -> bool:
    if node.op == "call_module":
        return any(f"{node.target}.{n}" in chosen for n, _ in model.get_submodule(str(node.target)).named_parameters())
    if node.op == "get_attr":
        return str(node.target) in chosen
    return False


def split(model: nn.Module, chosen: set[str]) -> Split | None:
    """Cut ``model`` before its first use of a ``chosen`` parameter; None when there is no frozen prefix."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - not traceable (data-dependent control flow): train the whole forward
        return None
    nodes = list(graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if _touches(n, model, chosen)), None)
    if cut is None:
        return None
    before = set(nodes[:cut])
    crossing = [n for n in nodes[:cut] if any(user not in before for user in n.users)]
    if len(crossing) != 1 or crossing[0].op == "placeholder":
        return None
    live = crossing[0]
    prefix_graph, env = fx.Graph(), dict[fx.Node, fx.Node]()
    for n in nodes[:cut]:
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(env[live])
    suffix_graph = fx.Graph()
    env = {live: suffix_graph.placeholder("features")}
    for n in nodes[cut:]:
        env[n] = suffix_graph.node_copy(n, lambda a: env[a])
    modules = [n.target for n in nodes[:cut] if n.op == "call_module"]
    name = f"{modules[0].split('.')[0]}..{modules[-1].split('.')[0]}" if modules else "prefix"
    return Split(fx.GraphModule(model, prefix_graph), fx.GraphModule(model, suffix_graph), name)


@torch.no_grad()
def cache(s: Split, ds: Dataset, preprocess: Preprocess, device: torch.device, batch_size: int = 128) -> Dataset:
    """The prefix's output for every example (eval mode), as a Dataset of float features."""
    s.prefix.eval()
    store: torch.Tensor | None = None
    for x, _, idx in data_mod.batches(ds, batch_size, device):
        out = s.prefix(preprocess(x)).float().cpu()
        if store is None:
            shape = (len(ds), *out.shape[1:])
            nbytes = int(np.prod(shape)) * 4
            if nbytes > MEMORY_BUDGET:
                path = tempfile.NamedTemporaryFile(prefix="beta-diag-features-", delete=False).name  # noqa: SIM115 - its name only
                store = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="w+", shape=shape))
                os.unlink(path)  # the mapping keeps the space until it is dropped; nothing is left behind
            else:
                store = torch.empty(shape)
        store[idx] = out
    if store is None:
        raise DataError(f"{ds.spec} ({ds.split}) holds no examples to train on")
    return Dataset(store, ds.labels, ds.class_names, ds.spec, ds.split)


@torch.no_grad()
def outputs(s: Split, cached: Dataset, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """The suffix's eval-mode outputs on cached features, in dataset order (float32, CPU): with the
    cache, the whole model's outputs from one pass of the prefix."""
    s.suffix.eval()
    out = [s.suffix(x).float().cpu() for x, _, _ in data_mod.batches(cached, batch_size, device)]
    return torch.cat(out)


def estimate_seconds(session: object, ds: Dataset, steps: int, batch_size: int) -> float:
    """Upper bound: one timed forward+backward of the whole model on a small batch, scaled to the steps."""
    model, pre, device = session.model, session.preprocess, session.device  # type: ignore[attr-defined]
    x, y, _ = next(data_mod.batches(ds, min(32, len(ds)), device))
    for _ in range(2):  # the first pass warms up allocators and kernels; time the second
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(pre(x)), y.clamp(min=0))  # a timing only: unlabelled images (-1) count as class 0
        torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return (time.perf_counter() - start) / y.numel() * batch_size * steps
