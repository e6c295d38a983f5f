"""Reading checkpoints: state dicts, torch / safetensors files, sharded and Hugging Face
folders and peft adapters, keyed by the live model's own parameter names."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

StateLike = Union[dict, str, Path]


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
