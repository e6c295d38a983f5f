"""The estimator's options as one dataclass, saved as JSON beside every store.

``hf.Influence(task, **kwargs).arguments`` is an :class:`InfluenceArguments`;
``to_dict()`` gives a JSON-friendly form (objects such as members, projections
and query transforms as their descriptions) that the estimator writes to
``<store>/arguments.json`` and that applications can save beside score files;
``from_dict`` reads it back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ._checks import integer
from .gradients.projected import ENGINES
from .projections import Dense, Factorized, Projection

FEATURE_FIELDS = ("members", "params", "projection", "store_dtype", "train_map")
"""The arguments the stored features depend on: checked when a store is reused."""


@dataclass
class InfluenceArguments:
    """The keyword arguments of :class:`hessfree.Influence` (see its docstring for each).

    ``to_dict()`` describes objects that JSON cannot hold: ``members`` by its
    ``repr``, a callable ``params`` by its name, each projection by
    ``describe()``, a query-transform instance by its ``options()``, ``device``
    and ``store`` as strings. ``from_dict`` rebuilds projections and
    query transforms; members and callables stay descriptions (pass the objects
    again to build an estimator).

    Attributes:
        members: ``None`` (the model as it is) or an :mod:`hessfree.members`
            collection: ``Checkpoints`` (TracIn-CP), ``Dropout``, ``WeightNoise``,
            ``Models``, or a product of them.
        params: which parameters: ``None`` (those with ``requires_grad``), ``"all"``,
            ``"last"``, a module-name prefix, a list of prefixes, or a callable.
        batch_size: training examples per per-example-gradient batch.
        device: where gradients are computed (default: the model's device).
        max_cache_bytes: per-example gradients of all members are kept in memory
            after ``fit`` when they fit in this many bytes (fp32); otherwise they
            are recomputed for each query.
        progress: show progress bars (``None``: only on a terminal).
        projection: ``None`` (exact gradients), an :mod:`hessfree.projections`
            projection (``Dense(k)`` or ``Factorized(k)``), or a list of them
            (each seed becomes an ensemble member; their scores are averaged).
            Target gradients are projected with the same matrices, so scores
            are unbiased estimates of the exact ones.
        store: a folder for an on-disk feature store (see
            :mod:`hessfree.store`): written once (resumably, shared by
            torch.distributed ranks), then reused by every later target,
            ``pairwise``, ``top_k`` and ``self_influence`` call, in this or a
            later session, without touching the training data. ``fit(train)``
            on a complete store hashes the data again (no gradients) and
            raises :class:`hessfree.store.StoreMismatchError` if any input,
            label, sample weight, the loss or the model changed.
        store_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` on disk
            (arithmetic is always fp32).
        hessian: ``"identity"`` (default, the Hessian-free product),
            ``"fisher"`` (curvature-corrected scores from the stored features:
            the damped empirical Fisher ``Phi^T Phi / n + damping I`` of the
            (projected) training features, inverted once per member; works with
            ``projection=`` and ``store=``; see
            :class:`hessfree.hessian.EmpiricalFisher`), or a comparator for
            studies on exact gradients: ``"exact"``, ``"cg"``, ``"lissa"``,
            ``"datainf"``, or an :mod:`hessfree.hessian` instance. Scores become
            ``g_i^T (H + damping I)^{-1} grad f`` with ``H`` the Hessian of the
            mean training loss or its approximation (``score_i / n`` predicts the
            rise of f when example i is removed and the model retrained);
            damping, eigenvalues and convergence are in :attr:`hessian_report_`.
        damping: ``lambda`` added to the curvature's diagonal (not with the
            identity); ``None``: the method's default (for ``"fisher"``
            ``0.1 x`` the mean eigenvalue of ``Phi^T Phi / n``, per member).
        hessian_options: further settings of the comparator, e.g.
            ``{"max_iter": 100, "tol": 1e-6}`` for CG or
            ``{"iterations": 500, "scale": 10.0}`` for LiSSA.
        engine: how per-example gradients are computed (see
            :mod:`hessfree.gradients`): ``"auto"`` (default: the hook engine for
            every parameter with a per-example rule, a per-example loop for the
            rest, announced by one warning), ``"hooks"`` (refuses a model with a
            parameter it has no rule for), ``"vmap"`` (``torch.func``) or
            ``"loop"`` (one backward per example: the slow reference). All give
            the same numbers; an engine that cannot handle a model raises
            :class:`hessfree.EngineError` naming the module and an engine that works.
        train_map: ``None`` (training features are the (projected) per-example
            gradients, like the queries') or a feature map applied to TRAINING
            examples only, ``train_map(feature_map, view, batch) -> (B, k)``, e.g.
            :class:`hessfree.selection.AdamDirections` (projected per-example Adam
            update directions; queries stay plain gradients). Stored features
            depend on it, so a store records and checks its ``repr``.
    """

    members: Any = None
    params: Any = None
    batch_size: int = 256
    device: Any = None
    max_cache_bytes: int = 1 << 30
    progress: bool | None = None
    projection: Any = None
    store: Any = None
    store_dtype: str = "float32"
    hessian: Any = "identity"
    damping: float | None = None
    hessian_options: dict | None = field(default=None)
    engine: str = "auto"
    train_map: Any = None

    def __post_init__(self) -> None:
        self.batch_size = integer(self.batch_size, "batch_size")
        self.max_cache_bytes = integer(self.max_cache_bytes, "max_cache_bytes", minimum=0)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.train_map is not None and not callable(self.train_map):
            raise TypeError(f"train_map must be callable (feature_map, view, batch) -> (B, k), got {self.train_map!r}")
        if self.store is not None and not isinstance(self.store, (str, os.PathLike)):
            raise TypeError(f"store must be a folder path, got {type(self.store).__name__}")

    def projections(self) -> list[Projection]:
        """``projection`` as a list (empty for exact gradients), each item checked."""
        if self.projection is None:
            return []
        items = list(self.projection) if isinstance(self.projection, (list, tuple)) else [self.projection]
        if not items:
            raise ValueError("projection=[] is empty; pass None for exact gradients")
        for p in items:
            if not isinstance(p, Projection):
                raise TypeError(
                    f"projection={p!r} is not understood; use hf.projections.Dense(k), "
                    "hf.projections.Factorized(k), a list of them, or None"
                )
        return items

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (see the class docstring)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        from .members import as_members

        out["members"] = self.members if isinstance(self.members, str) else repr(as_members(self.members))
        out["params"] = _describe_params(self.params)
        out["projection"] = [p.describe() for p in self.projections()] or None
        out["device"] = None if self.device is None else str(torch.device(self.device))
        out["store"] = None if self.store is None else os.fspath(self.store)
        if not isinstance(self.hessian, str):
            out["hessian"] = self.hessian.options()
        if self.train_map is not None:
            out["train_map"] = repr(self.train_map)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InfluenceArguments:
        """The arguments from ``to_dict()``'s output (unknown keys raise ``ValueError``)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Influence arguments {unknown}; known: {sorted(names)}")
        d = dict(d)
        if d.get("projection") is not None:
            d["projection"] = [_projection_from(p) for p in d["projection"]]
        if isinstance(d.get("hessian"), dict):
            from .hessian import METHODS

            opts = dict(d["hessian"])
            method = opts.pop("method")
            if method not in METHODS:
                raise ValueError(f"hessian method {method!r} is not known; use one of {sorted(METHODS)}")
            d["hessian"] = METHODS[method](**opts)
        return cls(**d)

    def features_dict(self) -> dict[str, Any]:
        """The part of ``to_dict()`` the stored features depend on (``FEATURE_FIELDS``)."""
        full = self.to_dict()
        return {k: full[k] for k in FEATURE_FIELDS}


def _describe_params(params: Any) -> Any:
    if params is None or isinstance(params, str):
        return params
    if isinstance(params, (list, tuple)) and all(isinstance(p, str) for p in params):
        return list(params)
    return f"<callable {getattr(params, '__qualname__', type(params).__name__)}>"


def _projection_from(d: dict[str, Any]) -> Projection:
    kind = d.get("type")
    if kind == "Dense":
        return Dense(d["dim"], kind=d["kind"], seed=d["seed"], block_rows=d.get("block_rows", 2048))
    if kind == "Factorized":
        return Factorized(d["dim"], seed=d["seed"], kind=d["kind"])
    raise ValueError(f"projection type {kind!r} is not known; use Dense or Factorized")
