"""Ensemble members: perturbed or saved copies of the model whose scores are summed.

A member is one set of parameters (plus, for dropout members, fixed activation
masks) at which gradients are taken. The score of a training example is

    score_i = sum_m w_m * grad l(z_i; theta_m) . grad f(theta_m)

with ``w_m`` the member weight (the learning rate for checkpoints, 1 otherwise).

Member collections combine with ``*`` (or a list): ``Checkpoints(...) * Dropout(n=5)``
gives every checkpoint with every dropout mask, weights multiplied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call

from .gradients.rules import replaying
from .gradients.selection import modules_in_call_order

StateLike = Union[dict, str, Path]


@dataclass(frozen=True)
class DropoutMasks:
    """Fixed Bernoulli masks on hidden activations of one member."""

    p: float
    seed: int
    modules: tuple[str, ...] | None
    scale: bool


@dataclass(frozen=True)
class MemberSpec:
    """Recipe for one member; materialised by :class:`MemberView`."""

    name: str
    weight: float = 1.0
    module: nn.Module | None = None
    state: StateLike | None = None
    noise: tuple[tuple[float, int, bool], ...] = ()
    masks: tuple[DropoutMasks, ...] = ()

    def combine(self, other: MemberSpec) -> MemberSpec:
        if self.module is not None and other.module is not None:
            raise ValueError("two member collections both supply models; combine Models with at most one")
        if self.state is not None and other.state is not None:
            raise ValueError("two member collections both supply checkpoints; use one Checkpoints")
        return MemberSpec(
            name=f"{self.name}*{other.name}",
            weight=self.weight * other.weight,
            module=self.module if self.module is not None else other.module,
            state=self.state if self.state is not None else other.state,
            noise=self.noise + other.noise,
            masks=self.masks + other.masks,
        )


class Members:
    """A collection of members. Iterate to get :class:`MemberSpec` recipes."""

    def specs(self) -> list[MemberSpec]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[MemberSpec]:
        return iter(self.specs())

    def __len__(self) -> int:
        return len(self.specs())

    def __mul__(self, other: Members) -> Members:
        return Product([self, other])


class AsIs(Members):
    """The model as it is (the default): one member of weight 1."""

    def specs(self) -> list[MemberSpec]:
        return [MemberSpec(name="model")]

    def __repr__(self) -> str:
        return "AsIs()"


class Checkpoints(Members):
    """Saved training checkpoints, for TracIn-CP.

    Args:
        states_or_paths: state dicts (parameter and buffer tensors) or paths to
            files written with ``torch.save(model.state_dict(), path)``; paths are
            loaded lazily, one at a time.
        lrs: learning rate in effect at each checkpoint (a number for all, or
            one per checkpoint). Each member's weight is its learning rate, so
            scores are in target units per the TracIn-CP sum of steps.
    """

    def __init__(self, states_or_paths: Sequence[StateLike], lrs: float | Sequence[float] = 1.0):
        states = list(states_or_paths)
        if not states:
            raise ValueError("Checkpoints needs at least one state dict or path")
        if isinstance(lrs, (int, float)):
            lrs = [float(lrs)] * len(states)
        lrs = [float(x) for x in lrs]
        if len(lrs) != len(states):
            raise ValueError(f"Checkpoints: {len(states)} checkpoints but {len(lrs)} learning rates")
        for s in states:
            if not isinstance(s, (dict, str, Path)):
                raise TypeError(f"checkpoints must be state dicts or paths, got {type(s).__name__}")
        self.states, self.lrs = states, lrs

    def specs(self) -> list[MemberSpec]:
        return [
            MemberSpec(name=f"ckpt{i}", weight=lr, state=s)
            for i, (s, lr) in enumerate(zip(self.states, self.lrs))
        ]

    def __repr__(self) -> str:
        return f"Checkpoints(n={len(self.states)}, lrs={self.lrs})"


class Dropout(Members):
    """The seed paper's dropout ensemble, for models with or without dropout layers.

    Member ``m`` draws a rate ``p_m ~ U(0, p_max)`` and one Bernoulli keep-mask
    per masked module (the same for every example), zeroing a share ``p_m`` of
    hidden units: the features of ``nn.Linear`` / ``nn.Embedding`` outputs (last
    dimension) and the channels of ``nn.ConvNd`` outputs (dimension 1).
    Kept units are scaled by ``1 / (1 - p_m)`` when ``scale`` is true.

    Args:
        n: number of members.
        p_max: upper end of the dropout-rate distribution, in [0, 1).
        seed: makes the rates and masks reproducible.
        modules: names of the modules whose outputs are masked; default every
            ``Linear`` / ``ConvNd`` / ``Embedding`` except the last one to run
            (the output layer).
        scale: inverted-dropout scaling of the kept units.
    """

    def __init__(
        self,
        n: int = 5,
        p_max: float = 0.1,
        seed: int = 0,
        modules: Sequence[str] | None = None,
        scale: bool = True,
    ):
        if n < 1:
            raise ValueError(f"Dropout: n must be >= 1, got {n}")
        if not 0.0 <= p_max < 1.0:
            raise ValueError(f"Dropout: p_max must be in [0, 1), got {p_max}")
        self.n, self.p_max, self.seed, self.scale = n, p_max, seed, scale
        self.modules = tuple(modules) if modules is not None else None

    def specs(self) -> list[MemberSpec]:
        gen = torch.Generator().manual_seed(self.seed)
        rates = (torch.rand(self.n, generator=gen, dtype=torch.float64) * self.p_max).tolist()
        return [
            MemberSpec(
                name=f"dropout{m}(p={p:.3f})",
                masks=(DropoutMasks(p=p, seed=self.seed * 1_000_003 + m, modules=self.modules, scale=self.scale),),
            )
            for m, p in enumerate(rates)
        ]

    def __repr__(self) -> str:
        return f"Dropout(n={self.n}, p_max={self.p_max}, seed={self.seed})"


class WeightNoise(Members):
    """Gaussian weight perturbation: ``theta_m = theta + sigma * eps``, eps ~ N(0, I).

    With ``relative=True`` the noise of each tensor is scaled by that tensor's
    root-mean-square value. All floating-point parameters are perturbed (not
    only the selected ones); buffers are left alone.
    """

    def __init__(self, n: int = 5, sigma: float = 0.01, seed: int = 0, relative: bool = False):
        if n < 1:
            raise ValueError(f"WeightNoise: n must be >= 1, got {n}")
        if sigma < 0:
            raise ValueError(f"WeightNoise: sigma must be >= 0, got {sigma}")
        self.n, self.sigma, self.seed, self.relative = n, sigma, seed, relative

    def specs(self) -> list[MemberSpec]:
        return [
            MemberSpec(name=f"noise{m}", noise=((self.sigma, self.seed * 1_000_003 + m, self.relative),))
            for m in range(self.n)
        ]

    def __repr__(self) -> str:
        return f"WeightNoise(n={self.n}, sigma={self.sigma}, seed={self.seed})"


class Models(Members):
    """Independently trained models (for example different seeds), weight 1 each."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        models = list(models)
        if not models:
            raise ValueError("Models needs at least one model")
        for m in models:
            if not isinstance(m, nn.Module):
                raise TypeError(f"Models takes nn.Module instances, got {type(m).__name__}")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models):
            raise ValueError(f"Models: {len(models)} models but {len(weights)} weights")
        self.models, self.weights = models, weights

    def specs(self) -> list[MemberSpec]:
        return [MemberSpec(name=f"model{i}", weight=w, module=m) for i, (m, w) in enumerate(zip(self.models, self.weights))]

    def __repr__(self) -> str:
        return f"Models(n={len(self.models)})"


class Product(Members):
    """Every combination of the members of several collections (weights multiply)."""

    def __init__(self, parts: Sequence[Members]):
        self.parts: list[Members] = []
        for p in parts:
            self.parts.extend(p.parts if isinstance(p, Product) else [as_members(p)])

    def specs(self) -> list[MemberSpec]:
        combos = [MemberSpec(name="")]
        for part in self.parts:
            combos = [a.combine(b) if a.name else b for a in combos for b in part.specs()]
        return combos

    def __repr__(self) -> str:
        return " * ".join(repr(p) for p in self.parts)


def as_members(members: Any) -> Members:
    if members is None:
        return AsIs()
    if isinstance(members, Members):
        return members
    if isinstance(members, (list, tuple)):
        if not members:
            raise ValueError("members=[] is empty; pass None for the model as it is")
        return Product(members) if len(members) > 1 else as_members(members[0])
    raise TypeError(
        f"members={members!r} is not understood; use hf.members.Checkpoints, Dropout, "
        "WeightNoise, Models, a product of them, or None"
    )


# ---- materialising a member ---------------------------------------------------------


def _load_state(state: StateLike) -> dict:
    if isinstance(state, (str, Path)):
        path = Path(state)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("a checkpoint must be a state dict of tensors (torch.save(model.state_dict(), path))")
    return state


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
    """

    def __init__(self, spec: MemberSpec, base: nn.Module, task, example, device: torch.device):
        self.spec, self.name, self.weight = spec, spec.name, spec.weight
        self.task = task
        self.module = spec.module if spec.module is not None else base
        params = {k: v.detach() for k, v in self.module.named_parameters()}
        params.update({k: v.detach() for k, v in self.module.named_buffers()})
        if spec.state is not None:
            state = _load_state(spec.state)
            missing = sorted(set(dict(self.module.named_parameters())) - set(state))
            unexpected = sorted(set(state) - set(params))
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint {spec.name} does not match the model: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}; save it with model.state_dict()"
                )
            for k, v in state.items():
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
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def member_views(specs: Sequence[MemberSpec], model: nn.Module, task, example, device: torch.device) -> Iterator[tuple[int, MemberView]]:
    """Each member in turn, materialised, masks active, its module in eval mode
    (the mode is restored afterwards)."""
    for m, spec in enumerate(specs):
        module = spec.module if spec.module is not None else model
        was = module.training
        module.eval()
        try:
            view = MemberView(spec, model, task, example, device)
            view.member_index = m
            with view:
                yield m, view
        finally:
            module.train(was)


def describe(members: Members) -> list[dict[str, Any]]:
    """A JSON-friendly description of each member (name and weight)."""
    return [{"name": s.name, "weight": s.weight} for s in members.specs()]

