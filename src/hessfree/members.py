"""Ensemble members: perturbed or saved copies of the model whose scores are summed.

A member is one set of parameters (plus, for dropout members, fixed activation
masks) at which gradients are taken. The score of a training example is

    score_i = sum_m w_m * grad l(z_i; theta_m) . grad f(theta_m)

with ``w_m`` the member weight (the learning rate for checkpoints, 1 otherwise).

Member collections combine with ``*`` (or a list): ``Checkpoints(...) * Dropout(n=5)``
gives every checkpoint with every dropout mask, weights multiplied.
"""

from __future__ import annotations

import json
import math
import re
import sys
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
        from .integrations import trainer_checkpoints

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


# Hugging Face file names (transformers.utils / peft.utils constants of the same value)
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS = "pytorch_model.bin"
WEIGHTS_INDEX = "pytorch_model.bin.index.json"
ADAPTER_SAFE_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
_MODEL_FILES = (SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX, WEIGHTS, WEIGHTS_INDEX)
_ADAPTER_FILES = (ADAPTER_SAFE_WEIGHTS, ADAPTER_WEIGHTS)

# adapter_config.json fields that do not change the adapted model's function
_BENIGN_ADAPTER_FIELDS = frozenset(
    {
        "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping", "task_type",
        "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "megatron_config", "megatron_core", "runtime_config",
    }
)  # fmt: skip


@dataclass
class _Saved:
    """Tensors as saved, before they are matched to the model."""

    tensors: dict[str, torch.Tensor]
    source: str
    adapter: bool = False  # read from a peft adapter file
    adapter_dir: Path | None = None  # folder holding its adapter_config.json


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors ships with transformers
        raise ImportError(f"reading {str(path)!r} needs the safetensors package: pip install safetensors") from e
    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {str(path)!r} could not be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise TypeError(
            f"checkpoint {str(path)!r} is not a state dict of tensors (found {keys}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard named in a Hugging Face ``*.index.json`` (its ``weight_map``)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(index)!r} is not a shard index with a 'weight_map' ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{str(index)!r}: its 'weight_map' is empty or not a mapping of tensor name to shard file")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard!r} named in {str(index)!r} does not exist")
        tensors.update(_read_file(path))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{str(index)!r} maps {absent[:5]} to shards that do not hold them")
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_checkpoint(state: StateLike, module: nn.Module) -> _Saved:
    if isinstance(state, dict):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(
                f"a checkpoint state dict must hold tensors only; {bad[:5]} are not tensors "
                "(pass model.state_dict(), not a training-state dict with optimizer or step entries)"
            )
        return _Saved(dict(state), "state dict")
    path = Path(state)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        adapter = path.name.startswith("adapter_model")
        config = adapter and (path.parent / ADAPTER_CONFIG).is_file()
        return _Saved(_read_file(path), repr(str(path)), adapter, path.parent if config else None)
    adapter_file = next((path / f for f in _ADAPTER_FILES if (path / f).is_file()), None)
    model_file = next((path / f for f in _MODEL_FILES if (path / f).is_file()), None)
    if adapter_file is not None and (model_file is None or _peft_model(module) is not None):
        return _Saved(_read_file(adapter_file), repr(str(adapter_file)), True, path)
    if model_file is not None:
        return _Saved(_read_file(model_file), repr(str(model_file)))
    found = sorted(p.name for p in path.iterdir())
    hint = (
        "; this looks like a Trainer output_dir: use Checkpoints.from_trainer(path)"
        if any(n.startswith("checkpoint-") for n in found)
        else ""
    )
    raise FileNotFoundError(
        f"checkpoint folder {str(path)!r} holds no model weights: expected one of {list(_MODEL_FILES)} "
        f"(a transformers checkpoint) or {list(_ADAPTER_FILES)} (a peft adapter); found {found[:12]}{hint}"
    )


def _peft_model(module: nn.Module):
    """``peft`` when ``module`` is a ``peft.PeftModel`` (peft is only looked at if already imported)."""
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(module, peft.PeftModel):
        return None
    return peft


def _aliases(module: nn.Module) -> dict[str, str]:
    """Every parameter / buffer name of ``module``, tied ones included, mapped to the
    name ``named_parameters()`` / ``named_buffers()`` use for that tensor."""
    out: dict[str, str] = {}
    for named in (module.named_parameters, module.named_buffers):
        first: dict[int, str] = {}
        for name, t in named(remove_duplicate=False):
            out[name] = first.setdefault(id(t), name)
    return out


def _adapter_name(module: nn.Module) -> str:
    names = list(getattr(module, "active_adapters", None) or [module.active_adapter])
    if len(names) != 1:
        raise ValueError(
            f"the PeftModel has {len(names)} active adapters {names}; a peft checkpoint fills one: "
            "call model.set_adapter(name) for the adapter it was trained as"
        )
    return names[0]


def _adapter_keys(module: nn.Module, name: str) -> tuple[dict[str, str], set[str]]:
    """Saved adapter key -> the model's parameter name, from peft's own
    ``get_peft_model_state_dict`` (called on the model's live tensors, so each
    saved key is matched to the very tensor it was read from), and the names
    every saved adapter holds (embedding layers are saved only in some cases)."""
    from peft.utils import get_peft_model_state_dict

    canonical = _aliases(module)
    owner: dict[int, str] = {}
    for named in (module.named_parameters, module.named_buffers):
        for n, t in named(remove_duplicate=False):
            owner.setdefault(id(t), canonical[n])
    live = module.state_dict(keep_vars=True)
    required = get_peft_model_state_dict(module, state_dict=live, adapter_name=name, save_embedding_layers=False)
    optional = get_peft_model_state_dict(module, state_dict=live, adapter_name=name, save_embedding_layers=True)
    mapping: dict[str, str] = {}
    for key, t in {**optional, **required}.items():
        if id(t) not in owner:
            raise ValueError(
                f"peft reports adapter entry {key!r} that is not a tensor of the model "
                f"(peft type {module.peft_config[name].peft_type}); this adapter type cannot be used as a checkpoint"
            )
        mapping[key] = owner[id(t)]
    return mapping, {mapping[k] for k in required}


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_normalised(v) for v in value]
        unordered = isinstance(value, (set, frozenset)) or all(isinstance(v, str) for v in items)
        return sorted(items, key=repr) if unordered else items
    if isinstance(value, dict):
        return {str(k): _normalised(v) for k, v in value.items()}
    return getattr(value, "value", value)  # enums (PeftType) compare by value


def _check_adapter_config(folder: Path, module: nn.Module, name: str, source: str) -> None:
    """Refuse an adapter trained with another configuration (rank, alpha, targets...),
    which would give the same keys but a different function."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"peft adapter {source} has no {ADAPTER_CONFIG} next to it; keep the folder written by save_pretrained"
        )
    saved = json.loads(path.read_text())
    live = module.peft_config[name].to_dict()
    for field in sorted(set(saved) & set(live) - _BENIGN_ADAPTER_FIELDS):
        if _normalised(saved[field]) != _normalised(live[field]):
            raise ValueError(
                f"peft adapter {source} was trained with {field}={saved[field]!r} but the model's adapter {name!r} "
                f"has {field}={live[field]!r}; build the PeftModel with the adapter's own config "
                f"(peft.PeftModel.from_pretrained(base_model, {str(folder)!r}))"
            )


def _match_adapter(saved: _Saved, module: nn.Module, name: str, mapping: dict[str, str], required: set[str]):
    if saved.adapter_dir is not None:
        _check_adapter_config(saved.adapter_dir, module, name, saved.source)
    live_names = set(mapping.values())
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in saved.tensors.items():
        target = mapping.get(key, key if key in live_names else None)
        if target is None:
            unknown.append(key)
            continue
        if target in out and not _equal(out[target], value):
            raise ValueError(f"peft adapter {saved.source} holds two different values for {target!r}")
        out[target] = value
    missing = sorted(required - set(out))
    if unknown or missing:
        raise ValueError(
            f"peft adapter {saved.source} does not match the model's adapter {name!r}: missing {missing[:5]}, "
            f"unexpected {sorted(unknown)[:5]}; build the PeftModel with the LoraConfig the adapter was trained with"
        )
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def _match_model(saved: _Saved, module: nn.Module) -> dict[str, torch.Tensor]:
    aliases = _aliases(module)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected = []
    for key, value in saved.tensors.items():
        name = aliases.get(key)
        if name is None:
            unexpected.append(key)
            continue
        if name in out:  # a second key for one tied tensor: accepted when the values agree
            first = out[name]
            if not _equal(first, value):
                diff = (
                    f"max |difference| {(first.double() - value.double()).abs().max().item():.3g}"
                    if first.shape == value.shape
                    else f"shapes {tuple(first.shape)} and {tuple(value.shape)}"
                )
                raise ValueError(
                    f"checkpoint {saved.source}: {origin[name]!r} and {key!r} are one tied tensor in the model, but "
                    f"the checkpoint holds different values for them ({diff}); it comes from a model without "
                    "these weights tied: build the model with the same weight tying (transformers: "
                    "config.tie_word_embeddings) as the one that was trained"
                )
            continue
        out[name], origin[name] = value, key
    # entries transformers itself skips when loading (old persistent attention-mask buffers, for example)
    ignored = getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [k for k in unexpected if not any(re.search(pattern, k) for pattern in ignored)]
    missing = sorted(set(dict(module.named_parameters())) - set(out))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {saved.source} does not match the model: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; save it with model.state_dict() (or save_pretrained) "
            "from a model of the same architecture"
        )
    return out


def load_checkpoint(state: StateLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read one checkpoint and key it by ``model``'s own parameter and buffer names.

    Args:
        state: a state dict, a file or a folder, as listed in :class:`Checkpoints`.
        model: the model the checkpoint is evaluated on (a ``peft.PeftModel`` for
            adapter checkpoints).

    Returns:
        ``{name: tensor}`` with names as in ``model.named_parameters()`` /
        ``model.named_buffers()`` (one entry per tied tensor), each tensor as
        saved (device and dtype unchanged) and of the model's shape. Every
        parameter is present, except for a peft adapter, which holds the
        adapter's parameters only (the base model's stay as they are).

    Raises:
        FileNotFoundError: a missing path, a folder without model weights, a
            missing shard or adapter config.
        TypeError: a state dict or file holding something other than tensors.
        ValueError: keys that do not match the model (named, missing and unexpected),
            tied keys with different values, a shape that differs from the model's,
            or an adapter trained with another peft configuration.
    """
    saved = _read_checkpoint(state, model)
    if saved.adapter and _peft_model(model) is None:
        raise ValueError(
            f"checkpoint {saved.source} is a peft adapter but the model is a {type(model).__name__}, not a "
            "peft.PeftModel; pass the PeftModel the adapter was trained on (peft.get_peft_model(base, config))"
        )
    if _peft_model(model) is not None:
        name = _adapter_name(model)
        mapping, required = _adapter_keys(model, name)
        # an adapter file, or a state dict with adapter entries only (saved or live names)
        if saved.adapter or set(saved.tensors) <= set(mapping) | set(mapping.values()):
            out = _match_adapter(saved, model, name, mapping, required)
        else:
            out = _match_model(saved, model)
    else:
        out = _match_model(saved, model)
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for k, v in out.items():
        if tuple(v.shape) != tuple(live[k].shape):
            raise ValueError(
                f"checkpoint {saved.source}: {k!r} has shape {tuple(v.shape)} but the model's is "
                f"{tuple(live[k].shape)}; the checkpoint comes from a model of another size"
            )
    return out


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

