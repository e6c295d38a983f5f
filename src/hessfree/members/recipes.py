"""Ensemble member recipes: which parameter sets (checkpoints, dropout masks, weight
noise, independently trained models) the scores are summed over, and their weights."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import integer
from .checkpoint import StateLike


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

    A checkpoint is any of:

    * a state dict (parameter and buffer tensors), for example ``model.state_dict()``;
      keys that name one tied tensor twice (a language model's input embedding and
      output head) are accepted when their two values are equal;
    * a file: ``torch.save(model.state_dict(), path)``, a ``.safetensors`` file, or a
      Hugging Face shard index (``model.safetensors.index.json`` /
      ``pytorch_model.bin.index.json``);
    * a Hugging Face folder, such as a ``transformers.Trainer`` ``checkpoint-N/``:
      ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
      ``pytorch_model.bin`` or its sharded index;
    * a peft adapter (folder with ``adapter_model.safetensors`` or ``adapter_model.bin``
      and ``adapter_config.json``, or the adapter file itself) when the model is a
      ``peft.PeftModel``: the saved keys are mapped onto the model's active adapter
      with peft's own ``get_peft_model_state_dict``; the base weights stay as they are
      in the model.

    Paths are read lazily, one checkpoint at a time (see :func:`load_checkpoint`).

    Args:
        states_or_paths: the checkpoints, in training order.
        lrs: learning rate in effect at each checkpoint (a number for all, or
            one per checkpoint); finite and >= 0. Each member's weight is its
            learning rate, so scores are in target units per the TracIn-CP sum of steps.

    Raises:
        ValueError: no checkpoints, a learning-rate count that differs from the
            checkpoint count, or a negative / non-finite learning rate.
        TypeError: a checkpoint that is neither a dict nor a path.
        FileNotFoundError: a path that does not exist.
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
        bad = [(i, x) for i, x in enumerate(lrs) if not (math.isfinite(x) and x >= 0)]
        if bad:
            raise ValueError(
                f"Checkpoints: learning rate {bad[0][1]} of checkpoint {bad[0][0]} is not a finite number >= 0; "
                "pass the rate the optimizer used at that checkpoint"
            )
        for s in states:
            if not isinstance(s, (dict, str, Path)):
                raise TypeError(f"checkpoints must be state dicts or paths, got {type(s).__name__}")
            if not isinstance(s, dict) and not Path(s).exists():
                raise FileNotFoundError(f"checkpoint {str(s)!r} does not exist")
        self.states, self.lrs = states, lrs
        self.steps: list[int] | None = None
        self.lr_sources: list[str] | None = None

    @classmethod
    def from_trainer(cls, output_dir: str | Path, lrs: float | Sequence[float] | None = None) -> Checkpoints:
        """Every ``checkpoint-N`` folder of a ``transformers.Trainer`` run, sorted by N.

        The learning rate of checkpoint N is the mean of the rates the optimizer
        used at each step since the previous checkpoint, read from

        1. ``hessfree_lr.json`` in the folder, written during training by
           :class:`hessfree.integrations.TrainerCallback` (the steps since the
           previous save); else
        2. the folder's ``trainer_state.json``, when its ``log_history`` holds a
           ``learning_rate`` for every step since the previous ``checkpoint-N``
           folder on disk (train with ``logging_steps=1``).

        Args:
            output_dir: the Trainer's ``output_dir``.
            lrs: the learning rates to use instead (a number for all, or one per
                checkpoint in step order).

        Returns:
            a :class:`Checkpoints` whose ``steps`` attribute holds N of each
            checkpoint and ``lr_sources`` where each rate came from.

        Raises:
            FileNotFoundError: ``output_dir`` is missing or holds no ``checkpoint-N`` folder.
            ValueError: a checkpoint's rate cannot be established (no callback file and
                a log history that misses steps); the message names the checkpoint and
                the fix (the callback, ``logging_steps=1`` or ``lrs=``).
        """
        from ..integrations import trainer_checkpoints

        found = trainer_checkpoints(output_dir, need_rates=lrs is None)
        out = cls([c.path for c in found], lrs=[c.lr for c in found] if lrs is None else lrs)
        out.steps = [c.step for c in found]
        out.lr_sources = [c.source for c in found] if lrs is None else ["lrs="] * len(found)
        return out

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
        n, seed = integer(n, "Dropout: n"), integer(seed, "Dropout: seed", minimum=None)
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
        n, seed = integer(n, "WeightNoise: n"), integer(seed, "WeightNoise: seed", minimum=None)
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
    """Independently trained models (for example different seeds), weight 1 each
    (``weights``: one finite number >= 0 per model; ``ValueError`` otherwise)."""

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
        bad = [(i, w) for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise ValueError(f"Models: weight {bad[0][1]} of model {bad[0][0]} is not a finite number >= 0 "
                             "(each model's scores are multiplied by its weight)")  # fmt: skip
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
