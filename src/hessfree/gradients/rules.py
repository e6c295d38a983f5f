"""Per-example gradient rules for the hook engine, one per layer kind.

A rule turns what one call of a layer leaves behind in a batched forward and
backward pass, its input ``a`` and the gradient ``d`` of the summed loss with
respect to its output, into the per-example gradients of that layer's own
parameters. Every rule here is exact (it is the chain rule written out for the
layer), so the hook engine equals a per-example autograd loop on the layers it
covers; :mod:`hessfree.gradients.engines` checks that on a probe batch.

Kinds and their rules (``t`` runs over the positions of one example):

=====================  ==========================================  ===========================
kind                   layers                                      per-example gradient
=====================  ==========================================  ===========================
``linear``             ``nn.Linear``                               ``sum_t d_t a_t^T``; bias ``sum_t d_t``
``transposed_linear``  ``transformers`` ``Conv1D`` (``x @ W + b``)  ``sum_t a_t d_t^T``; bias ``sum_t d_t``
``conv``               ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1,     ``sum_t d_t patch_t^T``; bias ``sum_t d_t``
                       zero padding)
``embedding``          ``nn.Embedding`` (no ``max_norm``)          ``sum_t onehot(i_t) d_t^T`` (``padding_idx`` rows 0)
``affine``             elementwise affine layers: ``LayerNorm``,   ``sum_t d_t * y0_t``; bias ``sum_t d_t``, with
                       ``GroupNorm``, ``BatchNorm`` (eval),        ``y0`` the layer's output at weight 1, bias 0
                       RMSNorm-style ``x_hat * w``
=====================  ==========================================  ===========================

A layer whose output has batch dimension 1 while the batch has ``B > 1``
examples (an input shared by the batch, such as position embeddings looked up
with ``arange(T)[None]``) has its output expanded to ``B`` copies inside the
pass, so each example's gradient flows through its own copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .._replay import replay, replaying
from ..data import Batch, batch_size_of

_KNOWN_AFFINE = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_AFFINE = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Unattributable(RuntimeError):
    """A layer call whose tensors cannot be split by example (raised inside the engine)."""


def _own(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters(recurse=False))


def layer_kind(m: nn.Module) -> str | None:
    """The rule kind of ``m`` (see the table above), or ``None`` without a rule."""
    own = set(_own(m))
    if isinstance(m, nn.Linear) and own <= {"weight", "bias"}:
        return "linear"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and own <= {"weight", "bias"} and m.weight.dim() == 2:
        return "transposed_linear"
    if (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and own <= {"weight", "bias"}
    ):
        return "conv"
    if isinstance(m, nn.Embedding) and own == {"weight"} and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    if "weight" in own and own <= {"weight", "bias"} and len(list(m.children())) == 0:
        return "affine"
    return None


def trusted_affine(m: nn.Module) -> bool:
    """Elementwise affine layers of torch whose rule needs no check on a probe."""
    return isinstance(m, _KNOWN_AFFINE) or type(m) is getattr(nn, "RMSNorm", None)


@dataclass
class Call:
    """One recorded call of a hooked layer: its inputs and (expanded) output."""

    module: str
    args: tuple
    kwargs: dict
    output: torch.Tensor
    grad: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        return self.args[0]


@dataclass
class Capture:
    """The calls of every hooked layer in one forward + backward pass of a batch."""

    batch_size: int
    calls: list[Call] = field(default_factory=list)
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, *shape) per-example gradients


def _expand(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.dim() > 0 and t.shape[0] == 1 and b > 1 else t


def capture(view, batch: Batch, modules: list[str], names: list[str], broadcast: list[str] = (),
            clone: set[str] | None = None) -> Capture:  # fmt: skip
    """Run the member's batched forward and backward once, recording every call of
    the layers ``modules`` and the gradient of the summed per-example loss with
    respect to each call's output (no parameter gradient is formed; the
    parameters ``names`` are marked as requiring one so the outputs are in the graph).
    Each parameter in ``broadcast`` (leading dimension 1) is replaced by one copy per
    example, whose gradients are the per-example gradients.

    ``clone``: layers whose output a later in-place operation changes (an
    ``inplace=True`` activation); their output is copied before it goes on. A layer
    found changed in place is added to the set and the pass is run again.
    """
    clone = set() if clone is None else clone
    while True:
        try:
            return _capture_once(view, batch, modules, names, broadcast, clone)
        except _ChangedInPlace as e:
            clone |= e.layers


class _ChangedInPlace(Exception):
    def __init__(self, layers: set[str]):
        self.layers = layers


def _capture_once(view, batch, modules, names, broadcast, clone) -> Capture:
    b = batch_size_of(batch)
    subs = dict(view.module.named_modules())
    cap = Capture(b)
    versions: list[int | None] = []
    handles = []

    def hook(mod, args, kwargs, output, name):
        if replaying() or not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return None
        out = _expand(output, b)  # a shared batch-1 output: one copy per example
        detached = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
        cap.calls.append(Call(name, detached, dict(kwargs), out))
        if out is not output or name in clone:
            versions.append(None)
            return out.clone()  # later in-place ops must not touch the recorded output
        versions.append(out._version)
        return None

    for name in modules:
        handles.append(subs[name].register_forward_hook(
            lambda m, a, k, o, name=name: hook(m, a, k, o, name), with_kwargs=True, prepend=True
        ))  # fmt: skip
    try:
        with torch.enable_grad():
            selected = {n: view.params[n].detach().requires_grad_(True) for n in names}
            copies = {n: view.params[n].detach().expand(b, *view.params[n].shape[1:]).clone().requires_grad_(True)
                      for n in broadcast}  # fmt: skip
            loss = view.task.per_example_loss(view.functional({**selected, **copies}), batch).sum()
            changed = {c.module for c, v in zip(cap.calls, versions) if v is not None and c.output._version != v}
            if changed:
                raise _ChangedInPlace(changed)
            outs = [c.output for c in cap.calls] + list(copies.values())
            live = [o.requires_grad for o in outs]
            wanted = [o for o, ok in zip(outs, live) if ok]
            got = iter(torch.autograd.grad(loss, wanted, allow_unused=True) if wanted and loss.requires_grad else [])
            grads = [next(got, None) if ok else None for ok in live]
    finally:
        for h in handles:
            h.remove()
    for c, g in zip(cap.calls, grads):
        c.output = c.output.detach()
        c.grad = None if g is None else g.detach()
    for (n, copy), g in zip(copies.items(), grads[len(cap.calls):]):
        g = torch.zeros_like(copy) if g is None else g.detach()
        cap.broadcast[n] = g.reshape(b, *view.params[n].shape)
    return cap


def batch_major(t: torch.Tensor, b: int, what: str, module: str) -> torch.Tensor:
    """``t`` with batch dimension ``b`` (a shared batch-1 tensor is expanded)."""
    t = _expand(t, b)
    if t.dim() == 0 or t.shape[0] != b:
        raise Unattributable(
            f"layer {module!r}: its {what} has shape {tuple(t.shape)}, not one row per example (batch {b})"
        )
    return t


def row_col(kind: str, mod: nn.Module, call: Call, b: int, p_rows, p_cols, bias: bool,
            dtype: torch.dtype = torch.float32):  # fmt: skip
    """Row and column vectors ``(B, T, k_rows)``, ``(B, T, k_cols)`` of one call of a
    matrix layer, such that its per-example gradient is ``sum_t r_t c_t^T``
    (projected by ``p_rows`` / ``p_cols`` when given; ``bias`` appends the bias
    column)."""
    a = batch_major(call.a, b, "input", call.module)
    d = batch_major(call.grad, b, "output", call.module)
    if kind == "embedding":
        idx = a.reshape(b, -1)
        d = d.reshape(b, idx.shape[1], -1).to(dtype)
        r = p_rows[idx] if p_rows is not None else F.one_hot(idx, mod.num_embeddings).to(dtype)
        if mod.padding_idx is not None:
            r = r * (idx != mod.padding_idx).unsqueeze(-1).to(r.dtype)
        return r, (d if p_cols is None else d @ p_cols)
    if kind in ("linear", "transposed_linear"):
        a = a.reshape(b, -1, a.shape[-1]).to(dtype)
        d = d.reshape(b, -1, d.shape[-1]).to(dtype)
    else:  # conv
        d = d.reshape(b, d.shape[1], -1).transpose(1, 2).to(dtype)
        if p_cols is not None:  # P_cols^T patches == a convolution with k_cols filters (no unfold)
            r = d if p_rows is None else d @ p_rows
            return r, _projected_patches(mod, a.to(dtype), p_cols, bias)
        a = _unfold(mod, a.to(dtype))  # (B, L, C_in * kernel) patches
    r = d if p_rows is None else d @ p_rows
    n_in = a.shape[-1]
    if p_cols is None:
        c = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a
    else:
        c = a @ p_cols[:n_in]
        if bias:
            c = c + p_cols[n_in]
    return r, c


def vector_grads(kind: str, mod: nn.Module, call: Call, b: int, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{full name: (B, *shape)}`` of the parameters ``names``
    (local name -> full name) of one call, for biases of matrix layers and for
    elementwise affine layers."""
    d = batch_major(call.grad, b, "output", call.module)
    own = _own(mod)
    out: dict[str, torch.Tensor] = {}
    if kind == "affine":
        shape = own["weight"].shape
        channel = isinstance(mod, _CHANNEL_AFFINE) or tuple(d.shape[-len(shape):]) != tuple(shape)
        if channel and not (len(shape) == 1 and d.dim() >= 2 and d.shape[1] == shape[0]):
            raise Unattributable(f"layer {call.module!r}: weight {tuple(shape)} does not line up with its output")

        def per_example(t: torch.Tensor) -> torch.Tensor:
            if channel:
                return t.reshape(b, shape[0], -1).sum(-1)
            return t.reshape(b, -1, *shape).sum(1)

        if "weight" in names:
            out[names["weight"]] = per_example(d * batch_major(_normalised(mod, call), b, "output", call.module))
        if "bias" in names:
            out[names["bias"]] = per_example(d)
        return out
    if "bias" in names:  # the bias of a matrix layer whose weight is handled elsewhere
        if kind == "conv":
            out[names["bias"]] = d.reshape(b, d.shape[1], -1).sum(-1)
        else:
            out[names["bias"]] = d.reshape(b, -1, d.shape[-1]).sum(1)
    return out


def _normalised(mod: nn.Module, call: Call) -> torch.Tensor:
    """The layer's output at weight 1 and bias 0 (``x_hat``), with hooks standing aside."""
    own = _own(mod)
    params = {k: torch.ones_like(v) if k == "weight" else torch.zeros_like(v) for k, v in own.items()}
    with replay(), torch.no_grad():
        return functional_call(mod, params, call.args, call.kwargs)


def matrix_shape(kind: str, mod: nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of the gradient matrix of a matrix layer's weight (no bias column)."""
    if kind == "linear":
        return mod.out_features, mod.in_features
    if kind == "transposed_linear":
        return mod.weight.shape[1], mod.weight.shape[0]
    if kind == "conv":
        return mod.out_channels, mod.in_channels * math.prod(mod.kernel_size)
    return mod.num_embeddings, mod.embedding_dim


def _projected_patches(mod: nn.Module, a: torch.Tensor, p_cols: torch.Tensor, bias: bool) -> torch.Tensor:
    """``unfold(a) @ p_cols`` computed as a convolution whose filters are the columns
    of ``p_cols`` (same stride, padding, dilation), ``(B, L, k_cols)``."""
    n_in = mod.in_channels * math.prod(mod.kernel_size)
    filters = p_cols[:n_in].T.reshape(p_cols.shape[1], mod.in_channels, *mod.kernel_size)
    conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
    c = conv(a, filters, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
    c = c.flatten(2).transpose(1, 2)
    return c + p_cols[n_in] if bias else c


def _unfold(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Input patches of a convolution, ``(B, L, C_in * prod(kernel))`` in weight order."""
    if isinstance(mod, nn.Conv1d):
        patches = F.unfold(
            a.unsqueeze(2),
            kernel_size=(1, mod.kernel_size[0]),
            dilation=(1, mod.dilation[0]),
            padding=(0, mod.padding[0]),
            stride=(1, mod.stride[0]),
        )
    else:
        patches = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return patches.transpose(1, 2)


def add_matrix_grads(out: dict[str, torch.Tensor], u, kind: str, mod: nn.Module, call, b: int, dtype) -> None:
    """Add one call's per-example gradients of a matrix layer (unit ``u`` of the plan:
    ``weight``, ``bias``, ``rows``, ``cols``) to ``out`` ``{name: (B, *shape)}``."""
    if kind == "embedding":  # rows of the one-hot are added by index: no (B, T, V) one-hot is formed
        idx = batch_major(call.a, b, "input", call.module).reshape(b, -1)
        d = batch_major(call.grad, b, "output", call.module).reshape(b, idx.shape[1], -1).to(dtype)
        g = torch.zeros(b * u.rows, u.cols, dtype=dtype, device=d.device)
        rows = (idx + torch.arange(b, device=idx.device)[:, None] * u.rows).reshape(-1)
        keep = torch.ones_like(rows, dtype=torch.bool) if mod.padding_idx is None else (idx != mod.padding_idx).reshape(-1)
        g.index_add_(0, rows[keep], d.reshape(-1, d.shape[-1])[keep])
        g = g.view(b, u.rows, u.cols)
    else:
        r, c = row_col(kind, mod, call, b, None, None, u.bias is not None, dtype)
        g = torch.bmm(r.transpose(1, 2), c)
    w_cols = g.shape[2] - (u.bias is not None)
    w = g[:, :, :w_cols]
    if kind == "transposed_linear":
        w = w.transpose(1, 2)
    w = w.reshape(b, *mod.weight.shape)
    # w is g's own memory (no bias) or already a copy (reshaping the strided slice): no clone needed;
    # the small bias view is cloned so that it does not keep all of g alive
    out[u.weight] = out[u.weight] + w if u.weight in out else w
    if u.bias is not None:
        bias = g[:, :, -1]
        out[u.bias] = out[u.bias] + bias if u.bias in out else bias.clone()
