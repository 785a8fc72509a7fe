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

Optionally, with ``direction`` (a gradient-shaped dict), each example's dot product with it is
returned too: ``coherence`` needs <g_i, S> for the errors' summed gradient S.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from beta_diag import data as data_mod
from beta_diag import distributed
from beta_diag.data import Dataset, Preprocess
from beta_diag.runtime import Progress

Direction = dict[str, torch.Tensor]
LinearOrConv = nn.Linear | nn.Conv2d  # the layers whose per-example weight gradients are factored (``_fast``)


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """t1 + t2 + ... in order (``sum`` without its leading 0)."""
    return functools.reduce(operator.add, tensors)


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ParamNorms:
    """Per-example squared gradient norms per parameter (and optional dot products with a direction)."""

    names: tuple[str, ...]
    sq_norms: torch.Tensor  # (N, P) float64
    dots: torch.Tensor | None  # (N, P) float64: <g_i, direction> per parameter
    losses: torch.Tensor  # (N,) float64


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

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self.active or not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return
            record = [args[0].detach()]
            self.calls.setdefault(name, []).append(record)
            output.register_hook(lambda grad: record.append(grad.detach()))  # fires with d/d(this output), even if later modified in place

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


Terms = tuple[torch.Tensor, torch.Tensor | None]  # per-example (squared norm, dot with direction), each (B,)


def _flat_terms(grads: torch.Tensor, d: torch.Tensor | None) -> Terms:
    """Terms of materialised per-example gradients ``grads`` (B, P)."""
    grads = grads.flatten(1)
    return torch.linalg.vecdot(grads, grads), None if d is None else grads @ d.reshape(-1)


def _module_terms(module: nn.Module, calls: list[list[torch.Tensor]], direction: Direction, prefix: str) -> dict[str, Terms]:
    """Per-example (squared norm, dot with direction) for each parameter of one module."""
    d_w, d_b = direction.get(f"{prefix}weight"), direction.get(f"{prefix}bias")
    if isinstance(module, NORMS):
        grads = [_norm_affine_grads(module, x, g) for x, g in calls]
        out = {"weight": _flat_terms(_total(w for w, _ in grads), d_w)} if getattr(module, "weight", None) is not None else {}
        if getattr(module, "bias", None) is not None:
            out["bias"] = _flat_terms(_total(b for _, b in grads), d_b)
        return out
    if len(calls) == 1 and isinstance(module, nn.Conv2d) and module.groups == 1 and calls[0][1][0, 0].numel() >= GROUPED_CONV_MIN_OUTPUT:
        x, g = calls[0]
        out = {"weight": _flat_terms(_conv_per_example_grads(module, x, g), d_w)}
        if module.bias is not None:
            out["bias"] = _flat_terms(g.sum((2, 3)), d_b)
        return out
    layer = cast(LinearOrConv, module)
    terms = [_weight_terms(layer, x, g) for x, g in calls]
    if len(terms) == 1:
        xs, gs, _ = terms[0]
        # <sum_l g_l x_l^T, D> = sum_l g_l^T D x_l: a projection, never the per-example gradient itself
        dot_w = None if d_w is None else torch.einsum("goi,bgil,bgol->b", _as_grouped(layer, d_w), xs, gs)
        out = {"weight": (_sq_norm_weight(xs, gs), dot_w)}
    else:  # called more than once: the per-call gradients add up before the norm
        full = _materialise(terms[0][0], terms[0][1])
        for xs, gs, _ in terms[1:]:
            full += _materialise(xs, gs)
        out = {"weight": _flat_terms(full, None if d_w is None else _as_grouped(layer, d_w))}
    if layer.bias is not None:
        out["bias"] = _flat_terms(_total(cast(torch.Tensor, t[2]) for t in terms), d_b)
    return out


def _as_grouped(module: LinearOrConv, weight_like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in the (G, O, I) layout of ``_materialise``."""
    if isinstance(module, nn.Linear):
        return weight_like.reshape(1, *weight_like.shape)
    return weight_like.reshape(module.groups, weight_like.shape[0] // module.groups, -1)


def _fallback(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    direction: Direction,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per-example gradients of the named parameters with torch.func (materialised, chunked)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(sub: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**params, **sub}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits.float(), yi.unsqueeze(0))

    sub = {n: params[n] for n in names}
    per: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    dots: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, x.shape[0], 8):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(sub, x[start : start + 8], y[start : start + 8])
        for n in names:
            flat = grads[n].flatten(1)
            per[n].append(flat.pow(2).sum(1))
            if n in direction:
                dots[n].append(flat @ direction[n].reshape(-1))
    return {n: (torch.cat(per[n]), torch.cat(dots[n]) if dots[n] else None) for n in names}


def per_example_norms(
    model: nn.Module,
    ds: Dataset,
    index: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 64,
    direction: Direction | None = None,
    progress: Progress | None = None,
) -> ParamNorms:
    """Squared per-example gradient norms of CE(f(x_i), y_i) for every trainable parameter.

    Args: ``index`` selects the examples of ``ds``; ``direction`` (optional, param name -> tensor)
    adds per-example dot products. Example: ``per_example_norms(model, ds, errors, pre, cpu)``.
    Under torchrun each process computes its share of the batches; every process gets all rows.
    """
    model.eval()
    world = distributed.current()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    modules = dict(model.named_modules())
    direction = {k: v.to(device) for k, v in (direction or {}).items()}
    col = {n: j for j, n in enumerate(names)}
    sq = torch.zeros(index.numel(), len(names), dtype=torch.float64)
    dots = torch.zeros_like(sq) if direction else None
    losses = torch.zeros(index.numel(), dtype=torch.float64)
    recorder = _Recorder(model)
    mine: list[slice] = []
    try:
        for row, x, y, _ in data_mod.numbered_batches(ds, batch_size, device, index=index, owns=world.owns):
            recorder.calls.clear()
            inputs = preprocess(x).requires_grad_(True)  # backward to the input reaches every hooked output
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            rows = slice(row, row + y.numel())
            mine.append(rows)
            losses[rows] = loss.detach().double().cpu()
            if recorder.calls:
                torch.autograd.grad(loss.sum(), inputs)  # weight gradients are never computed: only the hooks' output gradients
            covered: set[str] = set()
            for mname, calls in recorder.calls.items():
                if any(len(c) != 2 for c in calls):
                    continue  # output did not reach the loss: leave to the fallback
                prefix = f"{mname}."
                for pname, (s, d) in _module_terms(modules[mname], calls, direction, prefix).items():
                    full = prefix + pname
                    if full in col:
                        sq[rows, col[full]] = s.double().cpu()
                        if dots is not None and d is not None:
                            dots[rows, col[full]] = d.double().cpu()
                        covered.add(full)
            rest = [n for n in names if n not in covered]
            if rest:
                recorder.active = False
                for n, (s, d) in _fallback(model, rest, inputs.detach(), y, direction).items():
                    sq[rows, col[n]] = s.double().cpu()
                    if dots is not None and d is not None:
                        dots[rows, col[n]] = d.double().cpu()
                recorder.active = True
            if progress:
                progress("attribution", min(rows.stop * world.size, index.numel()), index.numel())
    finally:
        recorder.remove()
    if world.size > 1 and index.numel():  # this process filled its rows only: gather every process's, in order
        # some process owns rows, so every gather is a tensor
        sq, losses = (cast(torch.Tensor, world.gather_rows([(r.start, t[r]) for r in mine], index.numel())) for t in (sq, losses))
        dots = None if dots is None else world.gather_rows([(r.start, dots[r]) for r in mine], index.numel())
    return ParamNorms(tuple(names), sq, dots, losses)


def summed_gradient(
    model: nn.Module,
    ds: Dataset,
    index: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 128,
) -> Direction:
    """sum_i d CE(f(x_i), y_i) / d theta over the selected examples (eval mode), per parameter.

    Batch sums are added in batch order; under torchrun each process computes one batch per round
    and every process adds the round's batches in that same order, so the sum is bit-identical.
    """
    model.eval()
    world = distributed.current()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    owned = data_mod.numbered_batches(ds, batch_size, device, index=index, owns=world.owns)
    for _ in range(0, -(-index.numel() // batch_size), world.size):
        batch = next(owned, None)
        grads: Sequence[torch.Tensor | None] | None = None
        if batch is not None:
            _, x, y, _ = batch
            loss = F.cross_entropy(model(preprocess(x)).float(), y, reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            if world.size > 1:
                grads = [None if g is None else g.cpu() for g in grads]
        for batch_grads in world.round(grads):
            for n, gr in zip(params, batch_grads):  # type: ignore[call-overload]
                if gr is not None:
                    total[n] += gr.to(total[n].device)
    return total
