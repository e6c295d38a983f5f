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
  hooks, so the full per-example gradient is never formed. Parameters of other
  modules fall back to per-example gradients (``torch.func.vmap``) and a
  :class:`Dense` projection.

Passing a list of projections (for example ``[Factorized(1024, seed=s) for s in
range(4)]``) to ``hf.Influence(projection=...)`` makes each seed an ensemble
member; their scores are averaged, which shrinks the projection noise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def _check(dim: Any, seed: Any, kind: str) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"projection dim must be a positive integer, got {dim!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"projection seed must be an integer, got {seed!r}")
    if kind not in _KINDS:
        raise ValueError(f"projection kind must be one of {_KINDS}, got {kind!r}")


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
        _check(dim, seed, kind)
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.dim, self.kind, self.seed, self.block_rows = dim, kind, seed, int(block_rows)
        self.cache_bytes = int(cache_bytes)
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

    def project(self, x: torch.Tensor, key: str = "") -> torch.Tensor:
        """``x @ P`` for ``x`` of shape ``(B, D)`` -> ``(B, dim)`` in fp32.

        ``key`` names the gradient space (different keys give independent matrices).
        """
        if x.dim() != 2:
            raise ValueError(f"Dense.project expects (B, D) rows, got shape {tuple(x.shape)}")
        x = x.float()
        out = torch.zeros(x.shape[0], self.dim, device=x.device)
        for start in range(0, x.shape[1], self.block_rows):
            stop = min(start + self.block_rows, x.shape[1])
            out.addmm_(x[:, start:stop], self.block(start, stop, key, x.device))
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
        _check(1 if dim is None else dim, seed, kind)
        self.dim, self.seed, self.kind = dim, seed, kind
        self._factors: dict[tuple, torch.Tensor] = {}

    def factor(self, key: str, size: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The ``(size, k)`` factor for one side of one layer, or ``None`` (identity) when ``k == size``."""
        if k >= size:
            return None
        cache_key = (key, size, k, str(device))
        if cache_key not in self._factors:
            self._factors[cache_key] = random_matrix(size, k, self.kind, self.seed, key).to(device)
        return self._factors[cache_key]


# ---- planning: which parameters go where, and how many dimensions each gets -----------------


@dataclass
class Unit:
    """One block of the projected feature vector.

    ``kind`` is ``"linear"``, ``"conv"``, ``"embedding"`` (factorized) or
    ``"dense"`` (vmap fallback). ``rows x cols`` is the gradient matrix shape
    (for linear/conv the bias is an extra column); ``k_rows * k_cols`` numbers
    are kept (``k_rows = rows`` means no projection on that side).
    """

    kind: str
    module: str
    names: list[str]
    rows: int
    cols: int
    weight: str | None = None
    bias: str | None = None
    k_rows: int = 0
    k_cols: int = 0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def k(self) -> int:
        return self.k_rows * self.k_cols


def _conv_ok(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _layer_unit(name: str, m: nn.Module, selected: set[str]) -> Unit | None:
    prefix = f"{name}." if name else ""
    w, b = f"{prefix}weight", f"{prefix}bias"
    own = {f"{prefix}{n}" for n, _ in m.named_parameters(recurse=False)}
    chosen = own & selected
    if w not in chosen or not chosen <= {w, b}:
        return None
    has_bias = b in chosen
    if isinstance(m, nn.Linear):
        return Unit("linear", name, [], m.out_features, m.in_features + has_bias, w, b if has_bias else None)
    if _conv_ok(m):
        cols = m.in_channels * math.prod(m.kernel_size) + has_bias
        return Unit("conv", name, [], m.out_channels, cols, w, b if has_bias else None)
    if isinstance(m, nn.Embedding) and not has_bias:
        return Unit("embedding", name, [], m.num_embeddings, m.embedding_dim, w, None)
    return None


def plan_units(module: nn.Module, names: list[str], params: dict[str, torch.Tensor], dim: int | None) -> list[Unit]:
    """Split ``names`` into factorized layer units and one dense fallback unit and
    give each a share of ``dim`` (water-filling; see :class:`Factorized`).

    Units are ordered by the position of their first parameter in ``names``.
    """
    selected = set(names)
    units: list[Unit] = []
    covered: set[str] = set()
    for mname, m in module.named_modules():
        unit = _layer_unit(mname, m, selected)
        if unit is not None:
            unit.names = [n for n in names if n in (unit.weight, unit.bias)]
            units.append(unit)
            covered.update(unit.names)
    rest = [n for n in names if n not in covered]
    if rest:
        units.append(Unit("dense", "", rest, 1, sum(params[n].numel() for n in rest)))
    order = {n: i for i, n in enumerate(names)}
    units.sort(key=lambda u: order[u.names[0]])
    _allocate(units, dim)
    return units


def _allocate(units: list[Unit], dim: int | None) -> None:
    if dim is None:  # exact: nothing projected
        for u in units:
            u.k_rows, u.k_cols = u.rows, u.cols
        return
    left, todo = dim, sorted(units, key=lambda u: u.numel)
    if dim < len(units):
        raise ValueError(
            f"projection dim={dim} is smaller than the {len(units)} layers selected; "
            f"use dim >= {len(units)} or select fewer parameters with params=..."
        )
    for i, u in enumerate(todo):
        share = left // (len(todo) - i)
        if u.numel <= share:
            u.k_rows, u.k_cols = u.rows, u.cols
        elif u.kind == "dense":
            u.k_rows, u.k_cols = 1, share
        else:
            k_r = min(u.rows, max(1, math.isqrt(share)))
            k_c = min(u.cols, max(1, share // k_r))
            if k_c == u.cols:  # the column side is kept whole: give the rows the rest
                k_r = min(u.rows, max(1, share // k_c))
            u.k_rows, u.k_cols = k_r, k_c
        left -= u.k


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
