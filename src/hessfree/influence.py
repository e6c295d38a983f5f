"""The estimator: Hessian-free influence scores for any target.

    score_i = sum_m w_m * grad l(z_i; theta_m) . grad f(theta_m)

Units: a score is the first-order decrease of the target f caused by one SGD
step of unit learning rate on training example i alone (target units per unit
learning rate; for checkpoints the learning rates are folded into ``w_m``).
Positive = the example helps the target (a step on it lowers f).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ._feature_maps import FeatureMaps
from ._fingerprint import fingerprint_modules, first_changed
from ._progress import progress_bar
from ._scale import StoreMixin, _collectively
from ._store_writer import same_data_on_every_rank
from .arguments import InfluenceArguments
from .data import DataSource, batch_hash, slice_batch, to_device
from .distributed import RankFailedError, all_reduce_sum, rank_and_world
from .errors import DataError, ModelChangedError, NotFittedError, at_offset
from .feature_source import MemoryFeatures, fill_memory
from .gradients.functional import flatten
from .gradients.projected import ProjectedFeatures, probe_of
from .gradients.selection import ParamSpec, select_parameters
from .hessian import QueryTransform, make_inverse_hessian
from .hessian.base import MemberInputs
from .hessian.hvp import Objective
from .members import MemberView, as_members, member_views, model_device
from .projections import Projection, expand_members
from .queries import query_directions, transform_rows, transformed_self_scores
from .scoring import accumulate_scores
from .targets import Target
from .task import Task

_REDUCE = ("sum", "mean", None)


class Influence(FeatureMaps, StoreMixin):
    """Hessian-free (identity-Hessian) influence of training examples.

    Args:
        task: the :class:`hessfree.Task` (model, per-example loss, batch format).
        members, params, batch_size, device, max_cache_bytes, progress,
            projection, store, store_dtype, hessian, damping, hessian_options,
            engine, train_map: the options, each described in
            :class:`hessfree.arguments.InfluenceArguments`. In short: ``members``
            an :mod:`hessfree.members` collection (``Checkpoints`` for TracIn-CP,
            ``Models`` for independently trained models, ...); ``projection``
            ``Dense(k)`` / ``Factorized(k)`` (or a list: seeds become members);
            ``store`` a folder for the on-disk feature store; ``hessian``
            ``"identity"`` (default), ``"fisher"`` (curvature-corrected scores
            from the stored features, works with projections and stores), or a
            comparator on exact gradients (``"exact"``, ``"cg"``, ``"lissa"``,
            ``"datainf"``); ``engine`` how per-example gradients are computed.

    Call :meth:`fit` with the training data, then :meth:`influence`,
    :meth:`pairwise` or :meth:`self_influence`. The options are kept as
    ``est.arguments`` (an :class:`hessfree.arguments.InfluenceArguments`;
    ``est.arguments.to_dict()`` is what is saved beside a store).
    """

    def __init__(
        self,
        task: Task,
        members: Any = None,
        params: ParamSpec = None,
        *,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        max_cache_bytes: int = 1 << 30,
        progress: bool | None = None,
        projection: Projection | list[Projection] | None = None,
        store: str | os.PathLike | None = None,
        store_dtype: str = "float32",
        hessian: str | QueryTransform = "identity",
        damping: float | None = None,
        hessian_options: dict | None = None,
        engine: str = "auto",
        train_map: Any = None,
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be an hf.Task, got {type(task).__name__}; wrap your model in hf.ClassificationTask")
        self.arguments = args = InfluenceArguments(
            members=members, params=params, batch_size=batch_size, device=device, max_cache_bytes=max_cache_bytes,
            progress=progress, projection=projection, store=store, store_dtype=store_dtype, hessian=hessian,
            damping=damping, hessian_options=hessian_options, engine=engine, train_map=train_map,
        )  # fmt: skip
        self.task, self.members, self.params = task, as_members(members), params
        self.batch_size, self.max_cache_bytes, self.progress = args.batch_size, args.max_cache_bytes, progress
        self.device = model_device(task.model) if device is None else torch.device(device)
        self.projection, self._projections = projection, args.projections()
        self._store_path, self.store_dtype = self._check_store_args(store, store_dtype)
        self._store = None
        self.hessian = make_inverse_hessian(hessian, damping, hessian_options)
        if self.hessian is not None and self.hessian.space == "parameters" and (
            self._projections or self._store_path is not None
        ):
            raise ValueError(
                f"hessian={hessian!r} needs exact per-example gradients; use it with projection=None "
                "and store=None (Hessian comparators are for studies on small models), or use "
                "hessian='fisher', which works with projections and stores"
            )
        self.engine, self.train_map = engine, train_map
        self._fitted = False

    # ---- members ---------------------------------------------------------------
    def _views(self, desc: str | None = None) -> Iterator[tuple[int, MemberView]]:
        """Each member in turn, materialised, masks active, module in eval mode."""
        yield from member_views(self._specs, self.task.model, self.task, self._example, self.device)

    def _bar(self, total: int, desc: str):
        return progress_bar(total, desc, self.progress)

    @property
    def member_names(self) -> list[str]:
        """Names of the members, in the row order of ``reduce=None`` results."""
        self._check_fitted()
        return [s.name for s in self._specs]

    @property
    def member_weights(self) -> np.ndarray:
        """Weights ``w_m`` of the members (learning rates for checkpoints), ``(n_members,)``."""
        self._check_fitted()
        return np.array([s.weight for s in self._specs])

    def _member_inputs(self, m: int, view: MemberView) -> MemberInputs:
        """What a query transform may read about member ``m`` (never the estimator)."""
        names = self._names[m]
        source, device = getattr(self, "source", None), self.device
        return MemberInputs(
            name=view.name, index=m, n_train=self.n_train, dim=self._dims[m],
            params=tuple((k, view.params[k].numel()) for k in names),
            train_blocks=lambda: self._train_features(m, view),
            objective=None if source is None else (lambda: Objective(view, names, source, device)),
            train_weights=self._train_weights,
        )

    def _directions(self, view: MemberView, names: list[str], grad_flat: torch.Tensor):
        """``(g, q)``: a target gradient ``(D,)`` before and after the query transform
        (see :func:`hessfree.queries.query_directions`); scores use ``q``."""
        engine = self._engine(view, names)
        project = None if engine.projection is None else (lambda v: engine.project_flat(v.float()))
        return query_directions(self.hessian, lambda: self._member_inputs(view.member_index, view), project, grad_flat)

    def _query(self, view: MemberView, names: list[str], grad_flat: torch.Tensor) -> torch.Tensor:
        """A target gradient ``(D,)`` in query space (transformed, projected)."""
        return self._directions(view, names, grad_flat)[1]

    def _train_features(self, m: int, view: MemberView, bar=None):
        """This rank's training features of member ``m`` in blocks: held (memory or
        store) or, over the memory budget, computed again."""
        if self._train_source.has(m):
            yield from self._train_source.blocks(m, self.score_block_rows, self.device)
        else:
            yield from self._featurize(view, self._names[m], self.source, "training", bar, shard=True)

    # ---- fit ----------------------------------------------------------------------
    def fit(self, train: Any = None) -> Influence:
        """Compute (and, within ``max_cache_bytes``, keep) per-example training
        gradients of every member, and their squared norms.

        With ``store=path`` the features go to disk (resuming an interrupted
        run); a complete store is reused as it is, and ``fit()`` without data
        reopens it. Under torch.distributed each rank featurizes its share.

        Args:
            train: ``(X, y)`` / ``(X, y, w)`` tensors, a dict of tensors, a
                Dataset or a sequential DataLoader (``None``: reopen ``store``).
        """
        if train is None:
            return self._fit_from_store()
        self.source = DataSource(train, batch_size=self.batch_size, name="train")
        first = next(iter(self.source))
        self._first_batch_hash = batch_hash(first)  # checked across ranks and against a store
        self._probe = to_device(probe_of(first), self.device)
        self._example = slice_batch(self._probe, 0, 1)
        self.task.check_runs(self._example, "training")
        self.task.check_data(self.source)
        self._check_same_data()
        self._setup_members()
        if self._store_path is not None:
            self._fill_store()
        else:
            self._fill_memory()
        self.n_train = self.source.n
        self._mark_fitted()
        return self

    def _mark_fitted(self) -> None:
        self._fingerprint = fingerprint_modules(self._modules())
        self._fitted = True
        if self.hessian is not None:  # e.g. the Fisher's factorization, once, on every rank together
            for m, view in self._views():
                self.hessian.prepare(self._member_inputs(m, view))

    def target_directions(self, target: Target) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each member: the query vector before and after the query transform,
        each ``(D,)`` float64: ``grad f`` and ``(H + damping I)^{-1} grad f`` for a
        parameter-space comparator; the projected ``grad f`` (``grad f`` itself
        without projection) and ``F^{-1}`` times it for ``hessian="fisher"``;
        the (projected) ``grad f`` twice for the identity. The angle between the two says
        how far identity-Hessian scores are from curvature-corrected ones."""
        self._check_fitted()
        target.validate(self.task)
        out = []
        for m, view in self._views():
            names = self._names[m]
            g, q = self._directions(view, names, flatten(target.gradient(view, names), names))
            out.append((g.double().cpu().numpy(), q.double().cpu().numpy()))
        return out

    def _setup_members(self) -> None:
        """Expand members by projection seeds; resolve parameter names and feature sizes."""
        self._specs, self._member_projections = expand_members(self.members.specs(), self._projections)
        if self.hessian is not None:
            self.hessian.reset()
        self._engines: dict[int, ProjectedFeatures] = {}
        self._checked: dict[tuple, dict] = {}
        self._names: list[list[str]] = []
        self._dims: list[int] = []
        self._cache: dict[int, Any] = {}
        self._train_source = MemoryFeatures(self._cache, 0, np.zeros((len(self._specs), 0)))  # until filled
        self._store = None
        for _, view in self._views():
            names = select_parameters(view.module, self.params, view.call_order)
            self._names.append(names)
            try:
                self._dims.append(self._engine(view, names).dim)
            except DataError as err:  # the engine checks itself on training example 0
                raise at_offset(err, 0, "training") from None
        if self.hessian is not None:
            self.hessian.check_dims(self._dims)  # before any gradient is computed

    def _fill_memory(self) -> None:
        # a failure on any rank is raised on every rank before the collective sum
        self._sqnorms = np.zeros((len(self._specs), self.source.n))
        _collectively(lambda: fill_memory(self._member_streams(), self._cache, self._sqnorms, self.max_cache_bytes,
                                          self._bar(self.source.n * len(self._specs), "per-example gradients")),
                      "could not compute its share of the gradients", RankFailedError)  # fmt: skip
        self._sqnorms = all_reduce_sum(self._sqnorms)
        self._train_source = MemoryFeatures(self._cache, self.source.n, self._sqnorms)

    def _member_streams(self):
        """Per member: ``(m, name, bytes of all its features, feature blocks, squared-norm
        blocks or None)``, the blocks of this rank's batches (see ``fill_memory``)."""
        n = self.source.n
        for m, view in self._views():
            names = self._names[m]
            itemsize = 8 if view.params[names[0]].dtype == torch.float64 else 4
            engine = self._engine(view, names)
            norms = None
            if engine.exact and self.train_map is None:  # norms without forming gradients
                norms = ((o, engine.sqnorms(view, to_device(b, self.device)).numpy()) for o, b in self._own_batches(self.source))
            yield m, view.name, n * self._dims[m] * itemsize, self._featurize(view, names, self.source, "training", shard=True), norms

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("call est.fit(train) before asking for scores")
        changed = first_changed(self._fingerprint, self._modules())
        if changed:
            raise ModelChangedError(
                f"the model changed after fit() (parameter or buffer {changed!r} differs): the stored "
                "per-example gradients describe the old model; call est.fit(train) again"
            )

    def _modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose parameters the features depend on: the model and any member models."""
        mods = {"model": self.task.model}
        for i, spec in enumerate(self._specs):
            if spec.module is not None:
                mods[f"member{i}"] = spec.module
        return mods

    @property
    def _n_user_members(self) -> int:
        """Members as the user gave them (projection seeds are not members: their
        rows already carry weight ``w_m / n_seeds``, so they sum to a seed average)."""
        return max(1, len(self._specs) // max(1, len(self._projections)))

    def _reduce(self, rows: np.ndarray, reduce: str | None) -> np.ndarray:
        """Sum over members, or the mean over the user's members (``reduce="mean"``)."""
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
        return rows if reduce is None else rows.sum(0) / (self._n_user_members if reduce == "mean" else 1)

    # ---- queries ----------------------------------------------------------------------
    def influence(self, target: Target, reduce: str | None = "sum") -> np.ndarray:
        """Influence of every training example on ``target``.

        Returns:
            ``(n_train,)`` scores (``reduce="sum"`` or ``"mean"`` over members) or
            ``(n_members, n_train)`` with ``reduce=None`` (rows already multiplied
            by the member weights, so they sum to the ensemble score). Positive =
            a step on the example lowers the target; units: target units per unit
            learning rate.
        """
        self._check_fitted()
        if not isinstance(target, Target):
            raise TypeError(f"target must be an hf.targets target, got {type(target).__name__}")
        target.validate(self.task)
        same_data_on_every_rank(getattr(target, "source", None), "target data")  # collective under torch.distributed
        rows = np.zeros((len(self._specs), self.n_train))
        for m, view in self._views():
            names = self._names[m]
            g = flatten(target.gradient(view, names), names)
            if not bool(torch.isfinite(g).all()):
                raise FloatingPointError(f"the {target.name} target gradient is not finite at member {view.name!r}: "
                                         f"{target.not_finite()}")  # fmt: skip
            q = self._query(view, names, g)
            for offset, feats in self._train_features(m, view):
                dt = torch.promote_types(feats.dtype, q.dtype)  # a float32 store of a float64 model
                rows[m, offset : offset + feats.shape[0]] = view.weight * (feats.to(dt) @ q.to(dt)).double().cpu().numpy()
        return self._reduce(all_reduce_sum(rows), reduce)

    def pairwise(self, test: Any, reduce: str | None = "sum") -> np.ndarray:
        """Influence of each training example on each test example's loss.

        Returns:
            ``(n_test, n_train)`` (or ``(n_members, n_test, n_train)`` with
            ``reduce=None``): entry ``[j, i] = sum_m w_m g_test_j . g_train_i``,
            positive = a step on training example i lowers test example j's loss.
            float32 (float64 for a float64 model: the precision of the products);
            each ``(n_test, n_train)`` matrix is column-major (the products fill it
            block by block of training rows; ``np.ascontiguousarray`` gives a
            row-major copy).
        """
        self._check_fitted()
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
        source = DataSource(test, batch_size=self.batch_size, name="test")
        n_members = len(self._specs)
        # members summed as they come (memory (n_test, n_train)), held as (n_train, n_test): the result is its transpose
        acc = torch.empty((n_members, self.n_train, source.n) if reduce is None else (self.n_train, source.n),
                          dtype=self._score_dtype())  # fmt: skip
        for i, (m, view) in enumerate(self._views()):
            names = self._names[m]
            queries = torch.cat([self._query_rows(view, names, f) for _, f in self._featurize(view, names, source, "test")])
            accumulate_scores(acc[m] if reduce is None else acc, queries, self._train_features(m, view),
                              float(view.weight), fresh=reduce is None or i == 0)  # fmt: skip
        if rank_and_world()[1] > 1:  # summed over ranks in float64, then back to the products' dtype and layout
            acc = torch.from_numpy(all_reduce_sum(acc.numpy()).astype(acc.numpy().dtype))
        if reduce == "mean":
            acc /= self._n_user_members
        return acc.numpy().swapaxes(-1, -2)

    def query_features(self, data: Any, member: int = 0) -> torch.Tensor:
        """Per-example features of ``data`` at ``member`` mapped through the query transform:
        ``F^-1 phi`` with ``hessian="fisher"`` (a comparator's solve likewise), ``phi`` itself
        for the identity. Their inner products with the training features are the terms of
        :meth:`pairwise` before the member weight. Returns ``(n, feature_dim[member])``."""
        return self._member_features(data, member, query=True)

    def _query_rows(self, view: MemberView, names: list[str], feats: torch.Tensor) -> torch.Tensor:
        """Map per-example test features ``(B, D)`` to query space (the query
        transform applied to each row; the features themselves for the identity)."""
        return transform_rows(self.hessian, lambda: self._member_inputs(view.member_index, view), feats)

    def self_influence(self, reduce: str | None = "sum") -> np.ndarray:
        """``sum_m w_m ||grad l(z_i; theta_m)||^2``, shape ``(n_train,)`` (or
        ``(n_members, n_train)`` with ``reduce=None``). Large values flag
        examples the model finds hard or mislabelled; units: loss² per
        parameter² (per unit learning rate for checkpoints). With a Hessian
        comparator: ``sum_m w_m g_i^T (H_m + damping I)^{-1} g_i`` (with
        ``hessian="fisher"``: ``sum_m w_m phi_i^T F_m^{-1} phi_i``)."""
        self._check_fitted()
        if self.hessian is not None:
            if self.hessian.collective and rank_and_world()[1] > 1:
                raise ValueError(f"self_influence with hessian={self.hessian.name!r} under torch.distributed is not "
                                 "supported (each solve needs every rank's rows); run it in one process")  # fmt: skip
            rows = np.zeros((len(self._specs), self.n_train))
            for m, view in self._views():
                inputs = lambda m=m, view=view: self._member_inputs(m, view)  # noqa: E731
                for offset, vals in transformed_self_scores(self.hessian, inputs, self._train_features(m, view)):
                    rows[m, offset : offset + len(vals)] = view.weight * vals
            return self._reduce(all_reduce_sum(rows), reduce)
        rows = self._sqnorms * np.array([s.weight for s in self._specs])[:, None]  # fitted and current: checked above
        return self._reduce(rows, reduce)

    @property
    def hessian_report_(self) -> dict[str, dict]:
        """Per member, what the query transform did on its last solve or
        factorization (damping, iterations, relative residual, eigenvalues, ...);
        empty for the identity."""
        return {} if self.hessian is None else dict(self.hessian.report)

    def target_values(self, target: Target) -> np.ndarray:
        """The target f at each member, ``(n_members,)`` in target units."""
        self._check_fitted()
        target.validate(self.task)
        return np.array([target.value(view) for _, view in self._views()])
