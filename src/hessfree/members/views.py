"""Members made concrete: :class:`MemberView` (module, parameters, masks) and the loop
over members."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .._modes import eval_mode, module_mode
from .._replay import replaying
from ..params import modules_in_call_order
from .checkpoint import load_checkpoint
from .recipes import DropoutMasks, Members, MemberSpec


def _mask_dim(module: nn.Module) -> int:
    """Which output dimension holds the units of ``module`` (channels for convs)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    return -1


class MemberView:
    """A member made concrete: module, full parameter dict and fixed masks.

    Use as a context manager; the masks are active inside ``with``.

    Attributes:
        module: the ``nn.Module`` whose forward is used.
        params: every parameter and buffer (detached) at this member's values.
        weight: the member weight ``w_m``.
        member_index: the member's position in the estimator's member list
            (``None`` for a view built outside :func:`member_views`).
    """

    def __init__(
        self, spec: MemberSpec, base: nn.Module, task, example, device: torch.device, member_index: int | None = None
    ):
        self.spec, self.name, self.weight = spec, spec.name, spec.weight
        self.member_index = member_index
        self.task = task
        self.module = spec.module if spec.module is not None else base
        params = {k: v.detach() for k, v in self.module.named_parameters()}
        params.update({k: v.detach() for k, v in self.module.named_buffers()})
        if spec.state is not None:
            for k, v in load_checkpoint(spec.state, self.module).items():
                params[k] = v.to(device=params[k].device, dtype=params[k].dtype)
        for sigma, seed, relative in spec.noise:
            gen = torch.Generator().manual_seed(seed)
            for k, _ in self.module.named_parameters():
                p = params[k]
                if not p.is_floating_point():
                    continue
                eps = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                scale = sigma * (p.pow(2).mean().sqrt() if relative else 1.0)
                params[k] = p + scale * eps
        self.params = {k: v.to(device) for k, v in params.items()}
        self._masks: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._cudnn_was: bool | None = None
        self._example = example
        self._call_order: list[str] | None = None
        for m in spec.masks:
            self._build_masks(m)

    # ---- forward --------------------------------------------------------------
    def functional(self, selected: dict[str, torch.Tensor] | None = None) -> Callable:
        """A callable standing in for the module at this member's parameters,
        with ``selected`` overriding some of them (for differentiation)."""
        params = self.params if not selected else {**self.params, **selected}

        def call(*args, **kwargs):
            return functional_call(self.module, params, args, kwargs)

        return call

    def call_order(self) -> list[str]:
        if self._call_order is None:
            self._call_order = modules_in_call_order(
                self.module, lambda: self.task.forward(self.functional(), self._example)
            )
        return self._call_order

    # ---- dropout masks ----------------------------------------------------------
    def _build_masks(self, spec: DropoutMasks) -> None:
        subs = dict(self.module.named_modules())
        if spec.modules is None:
            kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
            names = [n for n in self.call_order() if isinstance(subs[n], kinds)][:-1]
            if not names:
                raise ValueError(
                    "Dropout members found no hidden Linear/Conv/Embedding layer to mask; "
                    "name the modules with Dropout(modules=[...])"
                )
        else:
            unknown = [n for n in spec.modules if n not in subs]
            if unknown:
                raise ValueError(f"Dropout(modules=...): no module named {unknown}; modules: {list(subs)[:12]}")
            names = list(spec.modules)
        sizes = self._unit_counts(names, subs)
        gen = torch.Generator().manual_seed(spec.seed)
        for name in names:
            keep = (torch.rand(sizes[name], generator=gen) >= spec.p).double()
            if spec.scale and spec.p > 0:
                keep = keep / (1.0 - spec.p)
            prev = self._masks.get(name)
            self._masks[name] = keep if prev is None else prev * keep

    def _unit_counts(self, names: list[str], subs: dict[str, nn.Module]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        handles = []
        for n in names:
            dim = _mask_dim(subs[n])

            def record(mod, inp, out, n=n, d=dim) -> None:
                sizes.setdefault(n, int(out.shape[d]))

            handles.append(subs[n].register_forward_hook(record))
        try:
            with torch.no_grad():
                self.task.forward(self.functional(), self._example)
        finally:
            for h in handles:
                h.remove()
        silent = [n for n in names if n not in sizes]
        if silent:
            raise ValueError(f"Dropout members: modules {silent} did not run in the forward pass")
        return sizes

    def __enter__(self) -> MemberView:
        subs = dict(self.module.named_modules())
        for name, mask in self._masks.items():
            module = subs[name]
            dim = _mask_dim(module)

            def hook(mod, inp, out, mask=mask, dim=dim):
                if replaying():  # a rule re-running the layer reads its unmasked output
                    return None
                shape = [1] * out.dim()
                shape[dim] = mask.numel()
                return out * mask.to(device=out.device, dtype=out.dtype).view(shape)

            self._handles.append(module.register_forward_hook(hook))
        if torch.backends.cudnn.enabled and _has_cuda_rnn(self.module):
            # cuDNN has no backward for recurrent layers in eval mode ("cudnn RNN backward can
            # only be called in training mode"); PyTorch's own kernels have, with the same numbers
            self._cudnn_was, torch.backends.cudnn.enabled = True, False
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._cudnn_was is not None:
            torch.backends.cudnn.enabled, self._cudnn_was = self._cudnn_was, None


def _has_cuda_rnn(module: nn.Module) -> bool:
    """Whether ``module`` holds a recurrent layer (GRU, LSTM, RNN) with parameters on a GPU."""
    return any(
        isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters(recurse=False)) for m in module.modules()
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def member_views(specs: Sequence[MemberSpec], model: nn.Module, task, example, device: torch.device) -> Iterator[tuple[int, MemberView]]:
    """Each member in turn, materialised, masks active, its module in eval mode
    (each submodule's mode is restored afterwards)."""
    for m, spec in enumerate(specs):
        module = spec.module if spec.module is not None else model
        with eval_mode(module):
            view = MemberView(spec, model, task, example, device, member_index=m)
            with view:
                yield m, view


@contextmanager
def single_view(task, model: nn.Module, example, eval_mode: bool = True) -> Iterator[MemberView]:
    """The plain ``model`` as one member named ``"model"`` (weight 1, no masks), entered.

    Args:
        task: the :class:`hessfree.Task` whose loss and forward the view uses.
        model: the module; its own device holds the view's parameters.
        example: one batch of size 1 (a forward pass on it finds the call order).
        eval_mode: put ``model`` in eval mode inside the block (its mode is
            restored afterwards, submodule by submodule); ``False`` leaves the mode as it is.

    Yields:
        the :class:`MemberView`, for targets' ``evaluate`` and one-off gradients.
    """
    with module_mode(model, False) if eval_mode else nullcontext():
        view = MemberView(MemberSpec(name="model", module=model), model, task, example, model_device(model))
        with view:
            yield view


def describe(members: Members) -> list[dict[str, Any]]:
    """A JSON-friendly description of each member (name and weight)."""
    return [{"name": s.name, "weight": s.weight} for s in members.specs()]
