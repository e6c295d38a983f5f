"""Cheap fingerprints of a model's tensors: notice a model changed after ``fit``."""

from __future__ import annotations

import torch


def fingerprint_modules(modules: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """Per tensor (parameters and floating buffers): storage, version counter, sum and
    norm in fp64: one cheap pass that notices in-place edits, ``.data`` writes and
    replaced tensors."""
    out = {}
    for key, mod in modules.items():
        tensors = {**dict(mod.named_parameters()), **{k: v for k, v in mod.named_buffers() if v.is_floating_point()}}
        for name, t in tensors.items():
            t = t.detach()
            out[f"{key}:{name}"] = (t.data_ptr(), tuple(t.shape), float(torch.sum(t, dtype=torch.float64)),
                                    float(torch.linalg.vector_norm(t, dtype=torch.float64)))  # fmt: skip
    return out


def first_changed(old: dict[str, tuple], modules: dict[str, torch.nn.Module]) -> str | None:
    """The first tensor whose fingerprint differs from ``old`` (``None``: unchanged)."""
    now = fingerprint_modules(modules)
    for k in sorted(set(old) | set(now)):
        if old.get(k) != now.get(k):
            return k.split(":", 1)[1]
    return None
