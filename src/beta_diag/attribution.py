"""Per-example, per-parameter gradient norms of the cross-entropy, batched and exact.

One forward and one backward per batch, model in eval mode (BatchNorm on running statistics, so
examples do not interact and per-example gradients are exact). Forward hooks on every module
that owns parameters keep its input; a tensor hook on its output keeps d(sum of losses)/d(output),
which for example i is exactly d loss_i / d output_i. From the pair (input, output gradient) each
layer type yields its per-example weight-gradient norm without a Python loop over examples:

- Linear, Conv2d: either materialise the per-example weight gradient with one batched einsum, or
  use the norm identity ||sum_l g_l x_l^T||^2 = sum_{l,l'} (x_l.x_l')(g_l.g_l') (Goodfellow 2015;
  "ghost norms" in Opacus/BackPACK), whichever costs fewer multiply-adds for the layer's shapes;
- BatchNorm (eval), LayerNorm, GroupNorm: closed forms from the normalised input;
- anything else (an Embedding, attention weights used without calling their module, a parameter
  owned by the root, a module called twice) falls back to torch.func's vmap(grad) for exactly
  those parameters, or the materialised sum over calls for modules called more than once.

The same pass sums the gradient over the examples (exactly: ``coherence`` needs the errors' summed
gradient S), and, given layer groups, sketches each example's gradient per group (``sketch``) so
that the bootstrap gets <g_i, S> without a second pass.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from beta_diag import data as data_mod
from beta_diag import distributed
from beta_diag.data import Dataset, Preprocess
from beta_diag.runtime import Progress
from beta_diag.sketch import GroupSketch

LinearOrConv = nn.Linear | nn.Conv2d  # the layers whose per-example weight gradients are factored (``_fast``)


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """t1 + t2 + ... in order (``sum`` without its leading 0)."""
    return functools.reduce(operator.add, tensors)


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ParamNorms:
    """Per-example squared gradient norms per parameter, the summed gradient, and the optional sketches."""

    names: tuple[str, ...]
    sq_norms: torch.Tensor  # (N, P) float64
    losses: torch.Tensor  # (N,) float64
    summed: dict[str, torch.Tensor]  # parameter name -> sum_i g_i, in the parameter's shape (float32, CPU)
    sketch: GroupSketch | None = None  # per-example sketches of the groups asked for


def _conv_unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, groups, C/groups * kh * kw, L) patches, as the convolution sees them."""
    padding = cast(tuple[int, int], module.padding)  # zero padding given as numbers: ``_fast`` sends the rest to the fallback
    u = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    return u.view(x.shape[0], module.groups, -1, u.shape[-1])


def _weight_terms(module: LinearOrConv, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-example (activation, output-gradient) factors: the weight gradient of example b is
    sum_l g[b, :, :, l] x[b, :, :, l]^T per group. Returns x (B, G, I, L), g (B, G, O, L), bias grad (B, O)."""
    if isinstance(module, nn.Linear):
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)  # (B, 1, I, T)
        gs = g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2).unsqueeze(1)  # (B, 1, O, T)
    else:  # Conv2d
        xs = _conv_unfold(module, x)  # (B, G, I*k*k, L)
        gs = g.reshape(g.shape[0], module.groups, -1, g.shape[2] * g.shape[3])  # (B, G, O/G, L)
    bias = gs.sum(-1).reshape(g.shape[0], -1) if module.bias is not None else None
    return xs, gs, bias


GROUPED_CONV_MIN_OUTPUT = 128  # output positions from which a grouped convolution beats unfolding (measured: 14x14 yes, 8x8 no)


def _conv_per_example_grads(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients of a convolution as one grouped convolution (B groups): no unfold.
    x: (B, C, H, W), g: (B, O, H', W') -> (B, O*C*kh*kw)."""
    b, c, h, w = x.shape
    o = g.shape[1]
    grads = conv2d_weight(
        x.reshape(1, b * c, h, w),
        (b * o, c, *module.kernel_size),
        g.reshape(1, b * o, *g.shape[2:]),
        module.stride,
        module.padding,
        module.dilation,
        groups=b,
    )
    return grads.reshape(b, -1)


def _materialise(xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bgil,bgol->bgoi", xs, gs)  # (B, G, O, I) per-example weight gradients


def _sq_norm_weight(xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """||per-example weight gradient||^2, by the cheaper of materialising and the norm identity."""
    _, _, i, l = xs.shape
    o = gs.shape[2]
    if l * l * (i + o) < l * i * o:
        xx = torch.einsum("bgil,bgim->bglm", xs, xs)  # (B, G, L, L)
        gg = torch.einsum("bgol,bgom->bglm", gs, gs)
        return (xx * gg).sum((1, 2, 3))
    return _materialise(xs, gs).pow(2).sum((1, 2, 3))


def _norm_affine_grads(
    module: nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example weight and bias gradients (B, C) of an eval-mode normalisation layer."""
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        if len(shape) == 1 and x.dim() > 2 and x.shape[-1] != shape[0] and x.shape[1] == shape[0]:
            x, g = x.movedim(1, -1), g.movedim(1, -1)  # LayerNorm2d (ConvNeXt): NCHW in and out, normalised over channels
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
        gw, gb = (g * xhat).sum(dims) if dims else g * xhat, g.sum(dims) if dims else g
        return gw.reshape(x.shape[0], -1), gb.reshape(x.shape[0], -1)
    if isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
    else:  # BatchNorm in eval mode: running statistics
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = cast(torch.Tensor, module.running_mean), cast(torch.Tensor, module.running_var)  # eval mode: ``_fast`` checked
        xhat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
    dims = tuple(range(2, x.dim()))
    return ((g * xhat).sum(dims) if dims else g * xhat), (g.sum(dims) if dims else g)


def _fast(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return not module.training and module.running_mean is not None
    return isinstance(module, (nn.Linear, nn.LayerNorm, nn.GroupNorm))


class _Recorder:
    """Forward hooks on parameter-owning modules: keep (input, output) and, via a tensor hook, d/d output."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[list[torch.Tensor]]] = {}
        self.handles = []
        self.active = True
        for name, module in model.named_modules():
            if name and _fast(module) and any(p.requires_grad for p in module.parameters(recurse=False)):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            if not self.active or not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return
            record = [args[0].detach()]
            self.calls.setdefault(name, []).append(record)
            output.register_hook(lambda grad: record.append(grad.detach()))  # fires with d/d(this output), even if later modified in place

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class _Grad:
    """One parameter's share of a batch: per-example squared norms and the batch's summed gradient."""

    sq: torch.Tensor  # (B,)
    total: torch.Tensor  # the parameter's shape


def _from_each(grads: torch.Tensor, shape: torch.Size, sketch: GroupSketch | None, name: str) -> _Grad:
    """A ``_Grad`` from materialised per-example gradients ``grads`` (B, ...), folded into the sketch."""
    flat = grads.flatten(1)
    if sketch is not None:
        sketch.fold(name, flat)
    return _Grad(torch.linalg.vecdot(flat, flat), flat.sum(0).reshape(shape))


def _batch_weight_grad(layer: LinearOrConv, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The batch's summed weight gradient from the layer's input and output gradient (autograd's own kernels)."""
    if isinstance(layer, nn.Linear):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return conv2d_weight(x, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation, layer.groups)


def _module_grads(module: nn.Module, calls: list[list[torch.Tensor]], sketch: GroupSketch | None, prefix: str) -> dict[str, _Grad]:
    """Per-example squared norms and the summed gradient of each parameter of one module; with a
    sketch, every example's gradient is sketched too."""
    out: dict[str, _Grad] = {}
    if isinstance(module, NORMS):
        grads = [_norm_affine_grads(module, x, g) for x, g in calls]
        if getattr(module, "weight", None) is not None:
            out["weight"] = _from_each(_total(w for w, _ in grads), module.weight.shape, sketch, f"{prefix}weight")
        if getattr(module, "bias", None) is not None:
            out["bias"] = _from_each(_total(b for _, b in grads), module.bias.shape, sketch, f"{prefix}bias")
        return out
    layer = cast(LinearOrConv, module)
    weight, bias = f"{prefix}weight", f"{prefix}bias"
    if len(calls) == 1 and isinstance(layer, nn.Conv2d) and layer.groups == 1 and calls[0][1][0, 0].numel() >= GROUPED_CONV_MIN_OUTPUT:
        x, g = calls[0]
        out["weight"] = _from_each(_conv_per_example_grads(layer, x, g), layer.weight.shape, sketch, weight)
        if layer.bias is not None:
            out["bias"] = _from_each(g.sum((2, 3)), layer.bias.shape, sketch, bias)
        return out
    terms = [_weight_terms(layer, x, g) for x, g in calls]
    if len(terms) == 1 and (sketch is None or not sketch.materialise(weight)):
        xs, gs, _ = terms[0]  # the norm identity where it is cheaper; the sum is the batch's weight gradient
        out["weight"] = _Grad(_sq_norm_weight(xs, gs), _batch_weight_grad(layer, *calls[0]))
        if sketch is not None:
            sketch.project(weight, xs, gs)
    else:  # a small layer while sketching, or called more than once: the per-call gradients add up before the norm
        out["weight"] = _from_each(_total(_materialise(xs, gs) for xs, gs, _ in terms), layer.weight.shape, sketch, weight)
    if layer.bias is not None:
        out["bias"] = _from_each(_total(cast(torch.Tensor, t[2]) for t in terms), layer.bias.shape, sketch, bias)
    return out


def _fallback(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, sketch: GroupSketch | None) -> dict[str, _Grad]:
    """Per-example gradients of the named parameters with torch.func (materialised, in chunks of 8)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(sub: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**params, **sub}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits.float(), yi.unsqueeze(0))

    sub = {n: params[n] for n in names}
    sq: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    total = {n: torch.zeros_like(params[n]) for n in names}
    for start in range(0, x.shape[0], 8):  # a chunk's gradients at a time: only its norms, sums and sketches are kept
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(sub, x[start : start + 8], y[start : start + 8])
        for n in names:
            flat = grads[n].flatten(1)
            sq[n].append(torch.linalg.vecdot(flat, flat))
            total[n] += flat.sum(0).reshape(total[n].shape)
            if sketch is not None:
                sketch.fold(n, flat, start)
    return {n: _Grad(torch.cat(sq[n]), total[n]) for n in names}


def per_example_norms(
    model: nn.Module,
    ds: Dataset,
    index: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 64,
    sketch_groups: Sequence[Sequence[str]] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> ParamNorms:
    """Squared per-example gradient norms of CE(f(x_i), y_i) for every trainable parameter, and their sum.

    Args: ``index`` selects the examples of ``ds``; ``sketch_groups`` (optional, lists of parameter
    names) also sketches each example's gradient per group (``sketch.GroupSketch``, signs from ``seed``).
    Example: ``per_example_norms(model, ds, errors, pre, cpu)``. Under torchrun each process computes
    its share of the batches and every process gets all rows; the batches' sums are added in batch
    order on every process, so the summed gradient is bit-identical to one process's.
    """
    model.eval()
    world = distributed.current()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    modules = dict(model.named_modules())
    sq = torch.zeros(index.numel(), len(names), dtype=torch.float64)
    losses = torch.zeros(index.numel(), dtype=torch.float64)
    # the sum stays on the device with one process; under torchrun each round's batch sums meet on the CPU
    sum_device = device if world.size == 1 else torch.device("cpu")
    summed = {n: torch.zeros_like(p, device=sum_device, dtype=torch.float32) for n, p in params.items()}
    sketch = None
    if sketch_groups is not None:
        sketch = GroupSketch(sketch_groups, {n: p.shape for n, p in params.items()}, index.numel(), device, seed)
    recorder = _Recorder(model)
    mine: list[slice] = []
    owned = data_mod.numbered_batches(ds, batch_size, device, index=index, owns=world.owns)
    try:
        for _ in range(0, -(-index.numel() // batch_size), world.size):
            batch = next(owned, None)
            totals: list[torch.Tensor] | None = None
            if batch is not None:
                row, x, y, _ = batch
                rows = slice(row, row + y.numel())
                mine.append(rows)
                if sketch is not None:
                    sketch.start(y.numel(), device)
                grads = _batch_grads(model, modules, recorder, names, preprocess(x), y, losses, rows, sketch)
                sq[rows] = torch.stack([grads[n].sq for n in names], 1).double().cpu()  # one copy to the host per batch
                if sketch is not None:
                    sketch.finish(rows)
                totals = [grads[n].total.float().to(sum_device) for n in names]
                if progress:
                    progress("attribution", min(rows.stop * world.size, index.numel()), index.numel())
            for batch_totals in world.round(totals):  # every process adds the round's batches in batch order
                for n, t in zip(names, cast(list[torch.Tensor], batch_totals or [])):
                    summed[n] += t
    finally:
        recorder.remove()
    if world.size > 1 and index.numel():  # this process filled its rows only: gather every process's, in order
        # some process owns rows, so every gather is a tensor
        sq, losses = (cast(torch.Tensor, world.gather_rows([(r.start, t[r]) for r in mine], index.numel())) for t in (sq, losses))
        if sketch is not None:
            sketch.rows = cast(torch.Tensor, world.gather_rows([(r.start, sketch.rows[r]) for r in mine], index.numel()))
    return ParamNorms(tuple(names), sq, losses, {n: t.cpu() for n, t in summed.items()}, sketch)


def _batch_grads(
    model: nn.Module,
    modules: dict[str, nn.Module],
    recorder: _Recorder,
    names: list[str],
    inputs: torch.Tensor,
    y: torch.Tensor,
    losses: torch.Tensor,
    rows: slice,
    sketch: GroupSketch | None,
) -> dict[str, _Grad]:
    """One forward and one backward over a batch: every trainable parameter's ``_Grad``."""
    recorder.calls.clear()
    inputs = inputs.requires_grad_(True)  # backward to the input reaches every hooked output
    loss = F.cross_entropy(model(inputs).float(), y, reduction="none")
    losses[rows] = loss.detach().double().cpu()
    if recorder.calls:
        torch.autograd.grad(loss.sum(), inputs)  # weight gradients are never computed by autograd: only the hooks' output gradients
    out: dict[str, _Grad] = {}
    trainable = set(names)
    for mname, calls in recorder.calls.items():
        if any(len(c) != 2 for c in calls):
            continue  # output did not reach the loss: leave to the fallback
        for pname, gr in _module_grads(modules[mname], calls, sketch, f"{mname}.").items():
            if f"{mname}.{pname}" in trainable:
                out[f"{mname}.{pname}"] = gr
    rest = [n for n in names if n not in out]
    if rest:
        recorder.active = False
        out.update(_fallback(model, rest, inputs.detach(), y, sketch))
        recorder.active = True
    return out
