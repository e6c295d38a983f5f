"""Seeded random projections of per-example gradients.

A projection maps a gradient ``g`` of ``D`` numbers to ``k = dim`` numbers with a
random matrix ``P`` (``D x k``) whose entries have mean 0 and variance ``1/k``,
so that ``E[(P^T g) . (P^T h)] = g . h``: projected inner products (and so
projected influence scores) are unbiased estimates of the exact ones, with a
relative spread of about ``sqrt(2 / k)``.

* :class:`Dense` projects the whole flat gradient. ``P`` is generated block by
  block (``block_rows`` rows at a time) from the seed, so the full matrix is
  never held in memory and every call regenerates exactly the same matrix.
* :class:`Factorized` projects the gradient of each ``nn.Linear``, ``nn.Conv1d``,
  ``nn.Conv2d`` and ``nn.Embedding`` with a Kronecker product of two small
  matrices, ``P = P_rows (x) P_cols``. For a layer whose per-example gradient is
  ``G = sum_t r_t c_t^T`` (output-gradient times input, summed over sequence or
  spatial positions ``t``), ``P_rows^T G P_cols = sum_t (P_rows^T r_t)(P_cols^T c_t)^T``
  is computed from forward inputs and backward output-gradients captured by
  hooks, so the full per-example gradient is never formed. The other parameters
  get exact per-example gradients from their own rules (or a per-example loop;
  see :mod:`hessfree.gradients`) and a :class:`Dense` projection.

Passing a list of projections (for example ``[Factorized(1024, seed=s) for s in
range(4)]``) to ``hf.Influence(projection=...)`` makes each seed an ensemble
member; their scores are averaged, which shrinks the projection noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from ._checks import integer

_KINDS = ("rademacher", "gaussian")


def block_seed(seed: int, key: str, block: int) -> int:
    """A 63-bit generator seed for one block of one projection matrix."""
    digest = hashlib.blake2b(f"{seed}/{key}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_matrix(rows: int, cols: int, kind: str, seed: int, key: str, block: int = 0) -> torch.Tensor:
    """A ``(rows, cols)`` fp32 CPU matrix with entries of mean 0 and variance ``1/cols``.

    Generated on the CPU from ``(seed, key, block)`` so it is the same on every
    device and in every process.
    """
    gen = torch.Generator().manual_seed(block_seed(seed, key, block))
    if kind == "rademacher":
        m = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float32).mul_(2.0).sub_(1.0)
    else:
        m = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    return m.mul_(1.0 / math.sqrt(cols))


def _check(dim: Any, seed: Any, kind: str) -> tuple[int, int]:
    """``(dim, seed)`` as Python ints (numpy integers accepted); ``ValueError`` naming a bad value."""
    dim, seed = integer(dim, "projection dim"), integer(seed, "projection seed", minimum=None)
    if kind not in _KINDS:
        raise ValueError(f"projection kind must be one of {_KINDS}, got {kind!r}")
    return dim, seed


class Projection:
    """Base class: a seeded map from gradients to ``dim`` numbers."""

    dim: int
    seed: int
    kind: str

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (stored with every gradient store)."""
        return {"type": type(self).__name__, "dim": self.dim, "seed": self.seed, "kind": self.kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, kind={self.kind!r}, seed={self.seed})"


class Dense(Projection):
    """Dense random projection ``x -> x @ P`` with ``P`` of shape ``(D, dim)``.

    Args:
        dim: output dimension ``k``.
        kind: ``"rademacher"`` (entries ``+-1/sqrt(k)``) or ``"gaussian"``
            (entries ``N(0, 1/k)``).
        seed: the matrix is a pure function of ``(seed, key)``.
        block_rows: rows of ``P`` generated at a time; memory ``block_rows * dim * 4`` bytes.
        cache_bytes: generated blocks are kept (first come, first kept) up to
            this many bytes and reused by later batches; the rest is generated
            again for every batch. ``0`` keeps nothing. The cache does not
            change any result, only the time.
    """

    def __init__(self, dim: int, kind: str = "rademacher", seed: int = 0, block_rows: int = 2048,
                 cache_bytes: int = 256 * 2**20):
        dim, seed = _check(dim, seed, kind)
        self.dim, self.kind, self.seed, self.block_rows = dim, kind, seed, integer(block_rows, "block_rows")
        self.cache_bytes = integer(cache_bytes, "cache_bytes", minimum=0)
        self._blocks: dict[tuple, torch.Tensor] = {}
        self._cached = 0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_rows": self.block_rows}  # the matrix depends on it

    def block(self, start: int, stop: int, key: str = "", device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``start:stop`` of ``P`` (``start`` a multiple of ``block_rows``), ``(stop-start, dim)``."""
        cache_key = (key, start, stop, str(device))
        hit = self._blocks.get(cache_key)
        if hit is not None:
            return hit
        block = random_matrix(stop - start, self.dim, self.kind, self.seed, key, start // self.block_rows).to(device)
        size = block.numel() * block.element_size()
        if self._cached + size <= self.cache_bytes:
            self._blocks[cache_key] = block
            self._cached += size
        return block

    def project(self, x: torch.Tensor | Sequence[torch.Tensor], key: str = "") -> torch.Tensor:
        """``x @ P`` for ``x`` of shape ``(B, D)`` -> ``(B, dim)`` in fp32.

        ``x`` may also be a list of ``(B, D_i)`` pieces that stand for their
        concatenation along the columns (``D = sum D_i``), which is then never formed.
        ``key`` names the gradient space (different keys give independent matrices).
        """
        pieces = list(x) if isinstance(x, (list, tuple)) else [x]
        if not pieces or not all(isinstance(p, torch.Tensor) for p in pieces):
            raise ValueError(f"Dense.project expects a (B, D) tensor or a non-empty list of (B, D_i) tensors, got "
                             f"{[type(p).__name__ for p in pieces] if pieces else 'an empty list'}")  # fmt: skip
        if any(p.dim() != 2 for p in pieces) or len({p.shape[0] for p in pieces}) > 1:
            raise ValueError(f"Dense.project expects (B, D) rows, the same B in every piece; got shapes "
                             f"{[tuple(p.shape) for p in pieces]}")  # fmt: skip
        total = sum(p.shape[1] for p in pieces)
        out = torch.zeros(pieces[0].shape[0], self.dim, device=pieces[0].device)
        col = 0  # the column of the concatenation where this piece starts
        for piece in pieces:
            piece = piece.float()
            width = piece.shape[1]
            for start in range(col // self.block_rows * self.block_rows, col + width, self.block_rows):
                stop = min(start + self.block_rows, total)  # the same blocks of P as for the concatenation
                lo, hi = max(start, col), min(stop, col + width)
                out.addmm_(piece[:, lo - col : hi - col], self.block(start, stop, key, piece.device)[lo - start : hi - start])
            col += width
        return out


class Factorized(Projection):
    """Kronecker-factored projection of layer gradients, computed from hooks.

    Args:
        dim: total output dimension ``k`` over all selected parameters. It is
            split evenly over the layers (water-filling: a layer whose gradient
            has fewer numbers than its share is kept exactly and the rest is
            shared by the others), so the realised dimension is at most ``dim``
            (:attr:`hessfree.Influence.feature_dim` reports it). Within a layer
            of shape ``R x C`` the share ``k_l`` becomes ``k_r * k_c`` with
            ``k_r ~ sqrt(k_l)``; a side that would keep all its numbers is not
            projected at all.
        seed: the factor matrices are pure functions of ``(seed, layer name)``.
        kind: entry distribution of the factors (``"rademacher"`` or ``"gaussian"``).

    ``dim=None`` keeps every gradient whole: exact per-example gradients
    (``k = D``), formed from the hooks as ``sum_t r_t c_t^T`` per layer, which on
    MLPs and CNNs is much faster than ``vmap`` (the features are then laid out
    per layer as ``[weight | bias]`` rows; inner products are unchanged).

    Supported layers: ``nn.Linear`` (any number of leading dimensions, summed),
    ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, zero padding; summed over
    positions) and ``nn.Embedding`` (positions equal to ``padding_idx`` contribute
    nothing, as in autograd). Output positions the loss ignores (padding under
    an attention mask) get zero output-gradient and so contribute nothing.
    """

    def __init__(self, dim: int | None, seed: int = 0, kind: str = "rademacher"):
        checked, seed = _check(1 if dim is None else dim, seed, kind)
        self.dim, self.seed, self.kind = None if dim is None else checked, seed, kind
        self._factors: dict[tuple, torch.Tensor] = {}

    def factor(self, key: str, size: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The ``(size, k)`` factor for one side of one layer, or ``None`` (identity) when ``k == size``."""
        if k >= size:
            return None
        cache_key = (key, size, k, str(device))
        if cache_key not in self._factors:
            self._factors[cache_key] = random_matrix(size, k, self.kind, self.seed, key).to(device)
        return self._factors[cache_key]


def expand_members(specs: list, projections: list[Projection]) -> tuple[list, list[Projection | None]]:
    """Every member with every projection seed: ``(specs, projection per spec)``.

    With ``S`` projections each member becomes ``S`` members of weight ``w_m / S``
    (so the ensemble sum averages over seeds), named ``"<member>*proj<s>"``.
    """
    from dataclasses import replace

    if not projections:
        return list(specs), [None] * len(specs)
    if len(projections) == 1:
        return list(specs), [projections[0]] * len(specs)
    out, projs = [], []
    for spec in specs:
        for s, p in enumerate(projections):
            out.append(replace(spec, name=f"{spec.name}*proj{s}", weight=spec.weight / len(projections)))
            projs.append(p)
    return out, projs
