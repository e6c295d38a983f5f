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

from ._progress import progress_bar
from ._scale import StoreMixin, _collectively
from .data import DataSource, batch_hash, slice_batch, to_device
from .distributed import RankFailedError, all_reduce_sum, rank_and_world
from .errors import ModelChangedError, NotFittedError
from .gradients.functional import flatten
from .gradients.projected import ProjectedFeatures, probe_of
from .gradients.selection import ParamSpec, select_parameters
from .hessian import QueryTransform, make_inverse_hessian
from .hessian.base import MemberInputs
from .hessian.hvp import Objective
from .members import MemberView, as_members, member_views, model_device
from .projections import Projection, expand_members
from .targets import Target
from .task import Task

_REDUCE = ("sum", "mean", None)
ENGINES = ("auto", "hooks", "vmap", "loop")


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic for fp32/fp16/bf16 models; fp64 models keep fp64."""
    return t if t.dtype == torch.float64 else t.float()


class Influence(StoreMixin):
    """Hessian-free (identity-Hessian) influence of training examples.

    Args:
        task: the :class:`hessfree.Task` (model, per-example loss, batch format).
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

    Call :meth:`fit` with the training data, then :meth:`influence`,
    :meth:`pairwise` or :meth:`self_influence`.
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
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be an hf.Task, got {type(task).__name__}; wrap your model in hf.ClassificationTask")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = task
        self.members = as_members(members)
        self.params = params
        self.batch_size = int(batch_size)
        self.device = model_device(task.model) if device is None else torch.device(device)
        self.max_cache_bytes = int(max_cache_bytes)
        self.progress = progress
        self.projection = projection
        self._projections = _as_projections(projection)
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
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
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

    # ---- features (per-example gradients; projection plugs in here) ------------
    def _features(self, view: MemberView, names: list[str], batch) -> torch.Tensor:
        """Per-example feature vectors ``(B, D)`` whose inner products give scores."""
        return _compute_dtype(self._engine(view, names).features(view, batch))

    def _member_inputs(self, m: int, view: MemberView) -> MemberInputs:
        """What a query transform may read about member ``m`` (never the estimator)."""
        names = self._names[m]
        source, device = getattr(self, "source", None), self.device
        return MemberInputs(
            name=view.name,
            index=m,
            n_train=self.n_train,
            params=tuple((k, view.params[k].numel()) for k in names),
            dim=self._dims[m],
            train_blocks=lambda: self._train_features(m, view),
            objective=None if source is None else (lambda: Objective(view, names, source, device)),
        )

    def _transform(self, view: MemberView, rows: torch.Tensor) -> torch.Tensor:
        """The query transform applied to ``(Q, D)`` rows, in their dtype and device."""
        out = self.hessian.transform(self._member_inputs(view.member_index, view), rows)
        return out.to(device=rows.device, dtype=rows.dtype)

    def _query(self, view: MemberView, names: list[str], grad_flat: torch.Tensor) -> torch.Tensor:
        """Map a target gradient ``(D,)`` into feature space and apply the query
        transform (identity; ``(H + damping I)^{-1}`` before projection for a
        parameter-space comparator, ``F^{-1}`` after it for the empirical Fisher)."""
        q = _compute_dtype(grad_flat)
        if self.hessian is not None and self.hessian.space == "parameters":
            q = self._transform(view, q[None])[0]
        engine = self._engine(view, names)
        if engine.projection is not None:
            q = engine.project_flat(q.float())
        if self.hessian is not None and self.hessian.space == "features":
            q = self._transform(view, q[None])[0]
        return q

    def _engine(self, view: MemberView, names: list[str]) -> ProjectedFeatures:
        """The feature map of ``view``'s member (built, and checked on the probe, once)."""
        m = view.member_index
        if m not in self._engines:
            proj = self._member_projections[m] if self._member_projections else None
            checked = self._checked.setdefault((id(view.module), tuple(names)), {})
            self._engines[m] = ProjectedFeatures(proj, view, names, self.engine, self._probe, checked)
        return self._engines[m]

    _feature_map = _engine

    @property
    def feature_dim(self) -> list[int]:
        """Length of each member's feature vector (the realised projection dimension,
        or the number of selected parameters without projection)."""
        self._check_fitted()
        return list(self._dims)

    def param_names(self, member: int = 0) -> list[str]:
        """The selected parameter names of ``member``: the order of flat gradients
        (``flatten``) that :meth:`feature_map` maps into feature space."""
        self._check_fitted()
        return list(self._names[member])

    def feature_map(self, member: int = 0) -> ProjectedFeatures:
        """The map from flat gradients of ``member`` (in :meth:`param_names` order)
        to its feature space: ``feature_map(m).project_flat(g)`` for ``g`` of shape
        ``(D,)`` or ``(B, D)`` gives ``(dim,)`` / ``(B, dim)``, with the same
        matrices used for the training features (the identity without projection)."""
        self._check_fitted()
        for m, view in self._views():
            if m == member:
                return self._feature_map(view, self._names[m])
        raise IndexError(f"member={member} is out of range: the estimator has {len(self._specs)} members")

    def features(self, data: Any, member: int = 0) -> torch.Tensor:
        """Per-example feature vectors of ``data`` at ``member``: the (projected)
        per-example gradients whose inner products give every score.

        Returns:
            ``(n, feature_dim[member])`` fp32 (fp64 for an fp64 model without
            projection); loss units per parameter unit.
        """
        self._check_fitted()
        source = DataSource(data, batch_size=self.batch_size, name="data")
        for m, view in self._views():
            if m == member:
                return torch.cat([f.cpu() for _, f in self._featurize(view, self._names[m], source, "data")])
        raise IndexError(f"member={member} is out of range: the estimator has {len(self._specs)} members")

    def _featurize(self, view: MemberView, names: list[str], source: DataSource, what: str, bar=None, shard: bool = False):
        batches = self._own_batches(source) if shard else source.batches()
        for offset, batch in batches:
            feats = self._features(view, names, to_device(batch, self.device))
            finite = torch.isfinite(feats.sum(dim=1))  # NaN/inf propagate; no temporary of feats' size
            if not bool(finite.all()):
                i = offset + int(torch.nonzero(~finite)[0, 0])
                raise FloatingPointError(
                    f"non-finite (NaN or inf) gradient for {what} example {i} at member {view.name!r}; "
                    "check that example's inputs and label, and the loss (log of 0, division by 0)"
                )
            if bar is not None:
                bar.update(feats.shape[0])
            yield offset, feats
            del feats  # hold one batch of features at a time, not two

    def _train_features(self, m: int, view: MemberView, bar=None):
        if self._store is not None:
            lo, hi = self._store_rows()
            for offset, feats in self._store.blocks(m, lo, hi, self.score_block_rows):
                yield offset, feats.to(self.device)
        elif m in self._cache and isinstance(self._cache[m], list):  # this rank's batches (distributed)
            for offset, feats in self._cache[m]:
                yield offset, feats.to(self.device)
        elif m in self._cache:
            feats = self._cache[m]
            for s in range(0, feats.shape[0], self.batch_size):
                yield s, feats[s : s + self.batch_size].to(self.device)
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
        self._first_batch_hash = batch_hash(first) if self._store_path is not None else None  # checked across ranks
        self._probe = to_device(probe_of(first), self.device)
        self._example = slice_batch(self._probe, 0, 1)
        self.task.check_data(self.source)
        self._setup_members()
        if self._store_path is not None:
            self._fill_store()
        else:
            self._fill_memory()
        self.n_train = self.source.n
        self._mark_fitted()
        return self

    def _mark_fitted(self) -> None:
        self._fingerprint = _fingerprint(self._modules())
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
            g = _compute_dtype(flatten(target.gradient(view, names), names))
            engine = self._engine(view, names)
            if engine.projection is not None and (self.hessian is None or self.hessian.space == "features"):
                g = engine.project_flat(g.float())
                q = g if self.hessian is None else self._transform(view, g[None])[0]
            else:
                q = self._query(view, names, g)
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
        self._store = None
        for _, view in self._views():
            names = select_parameters(view.module, self.params, view.call_order)
            self._names.append(names)
            self._dims.append(self._engine(view, names).dim)
        if self.hessian is not None:
            self.hessian.check_dims(self._dims)  # before any gradient is computed

    def _fill_memory(self) -> None:
        # a failure on any rank is raised on every rank before the collective sum
        _collectively(self._fill_memory_local, "could not compute its share of the gradients", RankFailedError)
        self._sqnorms = all_reduce_sum(self._sqnorms)

    def _fill_memory_local(self) -> None:
        n, n_members = self.source.n, len(self._specs)
        _, world = rank_and_world()
        self._sqnorms = np.zeros((n_members, n))
        budget = self.max_cache_bytes
        bar = self._bar(n * n_members, "per-example gradients")
        try:
            for m, view in self._views():
                names, dim = self._names[m], self._dims[m]
                itemsize = 8 if view.params[names[0]].dtype == torch.float64 else 4
                keep = n * dim * itemsize <= budget
                engine = self._engine(view, names)
                if not keep and engine.exact:  # norms only: no gradient is formed
                    for offset, batch in self._own_batches(self.source):
                        sq = engine.sqnorms(view, to_device(batch, self.device)).numpy()
                        if not np.isfinite(sq).all():
                            i = offset + int(np.flatnonzero(~np.isfinite(sq))[0])
                            raise FloatingPointError(f"non-finite gradient for training example {i} at member {view.name!r}")
                        self._sqnorms[m, offset : offset + len(sq)] = sq
                        bar.update(len(sq))
                    continue
                chunks = []
                for offset, feats in self._featurize(view, names, self.source, "training", bar, shard=True):
                    self._sqnorms[m, offset : offset + feats.shape[0]] = torch.einsum("bd,bd->b", feats, feats).double().cpu().numpy()
                    if keep:
                        chunks.append((offset, feats.cpu()))
                    del feats
                if keep:
                    self._cache[m] = chunks if world > 1 else torch.cat([f for _, f in chunks])
                    budget -= n * dim * itemsize
        finally:
            bar.close()

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("call est.fit(train) before asking for scores")
        changed = _changed(self._fingerprint, self._modules())
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
        if reduce is None:
            return rows
        total = rows.sum(0)
        return total / self._n_user_members if reduce == "mean" else total

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
        rows = np.zeros((len(self._specs), self.n_train))
        for m, view in self._views():
            names = self._names[m]
            g = flatten(target.gradient(view, names), names)
            if not bool(torch.isfinite(g).all()):
                raise FloatingPointError(f"the {target.name} target gradient is not finite at member {view.name!r}")
            q = self._query(view, names, g)
            for offset, feats in self._train_features(m, view):
                rows[m, offset : offset + feats.shape[0]] = view.weight * (feats @ q).double().cpu().numpy()
        return self._reduce(all_reduce_sum(rows), reduce)

    def pairwise(self, test: Any, reduce: str | None = "sum") -> np.ndarray:
        """Influence of each training example on each test example's loss.

        Returns:
            ``(n_test, n_train)`` (or ``(n_members, n_test, n_train)`` with
            ``reduce=None``): entry ``[j, i] = sum_m w_m g_test_j . g_train_i``,
            positive = a step on training example i lowers test example j's loss.
        """
        self._check_fitted()
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
        source = DataSource(test, batch_size=self.batch_size, name="test")
        n_members = len(self._specs)
        # with a reduction, members are summed as they come: memory (n_test, n_train), not n_members times that
        out = np.zeros((n_members, source.n, self.n_train) if reduce is None else (source.n, self.n_train))
        for m, view in self._views():
            names = self._names[m]
            queries = torch.cat([self._query_rows(view, names, f) for _, f in self._featurize(view, names, source, "test")])
            for offset, feats in self._train_features(m, view):
                block = view.weight * (queries @ feats.T).double().cpu().numpy()
                if reduce is None:
                    out[m, :, offset : offset + feats.shape[0]] = block
                else:
                    out[:, offset : offset + feats.shape[0]] += block
        out = all_reduce_sum(out)
        return out / self._n_user_members if reduce == "mean" else out

    def _query_rows(self, view: MemberView, names: list[str], feats: torch.Tensor) -> torch.Tensor:
        """Map per-example test features ``(B, D)`` to query space (the query
        transform applied to each row; the features themselves for the identity)."""
        return feats if self.hessian is None else self._transform(view, feats)

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
                for offset, feats in self._train_features(m, view):
                    solved = self._transform(view, feats)
                    rows[m, offset : offset + feats.shape[0]] = view.weight * (solved * feats).sum(1).double().cpu().numpy()
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


def _fingerprint(modules: dict[str, torch.nn.Module]) -> dict[str, tuple]:
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


def _changed(old: dict[str, tuple], modules: dict[str, torch.nn.Module]) -> str | None:
    """The first tensor whose fingerprint differs from ``old`` (``None``: unchanged)."""
    now = _fingerprint(modules)
    for k in sorted(set(old) | set(now)):
        if old.get(k) != now.get(k):
            return k.split(":", 1)[1]
    return None


def _as_projections(projection) -> list:
    if projection is None:
        return []
    items = list(projection) if isinstance(projection, (list, tuple)) else [projection]
    if not items:
        raise ValueError("projection=[] is empty; pass None for exact gradients")
    for p in items:
        if not isinstance(p, Projection):
            raise TypeError(
                f"projection={p!r} is not understood; use hf.projections.Dense(k), "
                "hf.projections.Factorized(k), a list of them, or None"
            )
    return items
