"""The estimator: Hessian-free influence scores for any target.

    score_i = sum_m w_m * grad l(z_i; theta_m) . grad f(theta_m)

Units: a score is the first-order decrease of the target f caused by one SGD
step of unit learning rate on training example i alone (target units per unit
learning rate; for checkpoints the learning rates are folded into ``w_m``).
Positive = the example helps the target (a step on it lowers f).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DataSource, to_device
from .gradients.functional import flat_per_example_grads, flatten
from .gradients.selection import ParamSpec, select_parameters
from .hessian import InverseHessian, make_inverse_hessian
from .hessian import self_influence as _hessian_self_influence
from .members import MemberView, as_members
from .targets import Target
from .task import Task

_REDUCE = ("sum", "mean", None)


class NotFittedError(RuntimeError):
    pass


class Influence:
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
        hessian: ``"identity"`` (default, the Hessian-free product) or a
            comparator for studies: ``"exact"``, ``"cg"``, ``"lissa"``,
            ``"datainf"`` or an :mod:`hessfree.hessian` instance. With a
            comparator, scores are ``g_i^T (H + damping I)^{-1} grad f`` with
            ``H`` the Hessian of the mean training loss (``score_i / n`` predicts
            the rise of f when example i is removed and the model retrained);
            convergence is in :attr:`hessian_report_`.
        damping: ``lambda`` added to the Hessian's diagonal (comparators only).
        hessian_options: further settings of the comparator, e.g.
            ``{"max_iter": 100, "tol": 1e-6}`` for CG or
            ``{"iterations": 500, "scale": 10.0}`` for LiSSA.

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
        hessian: str | InverseHessian = "identity",
        damping: float | None = None,
        hessian_options: dict | None = None,
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be an hf.Task, got {type(task).__name__}; wrap your model in hf.ClassificationTask")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = task
        self.members = as_members(members)
        self.params = params
        self.batch_size = int(batch_size)
        if device is None:
            first = next(task.model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.max_cache_bytes = int(max_cache_bytes)
        self.progress = progress
        self.hessian = make_inverse_hessian(hessian, damping, hessian_options)
        self._fitted = False

    # ---- members ---------------------------------------------------------------
    @contextmanager
    def _eval_mode(self, module: torch.nn.Module):
        was = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was)

    def _views(self, desc: str | None = None) -> Iterator[tuple[int, MemberView]]:
        """Each member in turn, materialised, masks active, module in eval mode."""
        for m, spec in enumerate(self._specs):
            module = spec.module if spec.module is not None else self.task.model
            with self._eval_mode(module):
                view = MemberView(spec, self.task.model, self.task, self._example, self.device)
                with view:
                    yield m, view

    def _bar(self, total: int, desc: str):
        disable = {True: False, False: True, None: None}[self.progress]
        return tqdm(total=total, desc=desc, disable=disable, leave=False)

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
        return flat_per_example_grads(view, names, batch).float()

    def _query(self, view: MemberView, names: list[str], grad_flat: torch.Tensor) -> torch.Tensor:
        """Map a target gradient ``(D,)`` into feature space (identity Hessian,
        or ``(H + damping I)^{-1}`` with a Hessian comparator)."""
        if self.hessian is not None:
            grad_flat = self.hessian.solve(self, view, names, grad_flat[None].float())[0].to(grad_flat.device)
        return grad_flat.float()

    def _featurize(self, view: MemberView, names: list[str], source: DataSource, what: str, bar=None):
        for offset, batch in source.batches():
            feats = self._features(view, names, to_device(batch, self.device))
            finite = torch.isfinite(feats).all(dim=1)
            if not bool(finite.all()):
                i = offset + int(torch.nonzero(~finite)[0, 0])
                raise FloatingPointError(
                    f"non-finite (NaN or inf) gradient for {what} example {i} at member {view.name!r}; "
                    "check that example's inputs and label, and the loss (log of 0, division by 0)"
                )
            if bar is not None:
                bar.update(feats.shape[0])
            yield offset, feats

    def _train_features(self, m: int, view: MemberView, bar=None):
        if m in self._cache:
            feats = self._cache[m]
            for s in range(0, feats.shape[0], self.batch_size):
                yield s, feats[s : s + self.batch_size].to(self.device)
        else:
            yield from self._featurize(view, self._names[m], self.source, "training", bar)

    # ---- fit ----------------------------------------------------------------------
    def fit(self, train: Any) -> Influence:
        """Compute (and, within ``max_cache_bytes``, keep) per-example training
        gradients of every member, and their squared norms.

        Args:
            train: ``(X, y)`` / ``(X, y, w)`` tensors, a dict of tensors, a
                Dataset or a sequential DataLoader.
        """
        self.source = DataSource(train, batch_size=self.batch_size, name="train")
        if self.hessian is not None:
            self.hessian.reset()
        self._example = to_device(self.source.first_example(), self.device)
        self._specs = self.members.specs()
        n, n_members = self.source.n, len(self._specs)
        self._names: list[list[str]] = []
        self._cache: dict[int, torch.Tensor] = {}
        self._sqnorms = np.zeros((n_members, n))
        budget = self.max_cache_bytes
        bar = self._bar(n * n_members, "per-example gradients")
        try:
            for m, view in self._views():
                names = select_parameters(view.module, self.params, view.call_order)
                self._names.append(names)
                dim = sum(view.params[k].numel() for k in names)
                keep = n * dim * 4 <= budget
                chunks = []
                for offset, feats in self._featurize(view, names, self.source, "training", bar):
                    self._sqnorms[m, offset : offset + feats.shape[0]] = feats.pow(2).sum(1).double().cpu().numpy()
                    if keep:
                        chunks.append(feats.cpu())
                if keep:
                    self._cache[m] = torch.cat(chunks)
                    budget -= n * dim * 4
        finally:
            bar.close()
        self.n_train = n
        self._fitted = True
        return self

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("call est.fit(train) before asking for scores")

    @staticmethod
    def _reduce(rows: np.ndarray, reduce: str | None) -> np.ndarray:
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
        if reduce is None:
            return rows
        return rows.sum(0) if reduce == "sum" else rows.mean(0)

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
        return self._reduce(rows, reduce)

    def pairwise(self, test: Any, reduce: str | None = "sum") -> np.ndarray:
        """Influence of each training example on each test example's loss.

        Returns:
            ``(n_test, n_train)`` (or ``(n_members, n_test, n_train)`` with
            ``reduce=None``): entry ``[j, i] = sum_m w_m g_test_j . g_train_i``,
            positive = a step on training example i lowers test example j's loss.
        """
        self._check_fitted()
        source = DataSource(test, batch_size=self.batch_size, name="test")
        rows = np.zeros((len(self._specs), source.n, self.n_train))
        for m, view in self._views():
            names = self._names[m]
            queries = torch.cat([self._query_rows(view, names, f) for _, f in self._featurize(view, names, source, "test")])
            for offset, feats in self._train_features(m, view):
                rows[m, :, offset : offset + feats.shape[0]] = view.weight * (queries @ feats.T).double().cpu().numpy()
        return self._reduce(rows, reduce)

    def _query_rows(self, view: MemberView, names: list[str], feats: torch.Tensor) -> torch.Tensor:
        """Map per-example test features ``(B, D)`` to query space (identity, or
        ``(H + damping I)^{-1}`` applied to each row with a Hessian comparator)."""
        if self.hessian is not None:
            return self.hessian.solve(self, view, names, feats).to(feats.device)
        return feats

    def self_influence(self, reduce: str | None = "sum") -> np.ndarray:
        """``sum_m w_m ||grad l(z_i; theta_m)||^2``, shape ``(n_train,)`` (or
        ``(n_members, n_train)`` with ``reduce=None``). Large values flag
        examples the model finds hard or mislabelled; units: loss² per
        parameter² (per unit learning rate for checkpoints). With a Hessian
        comparator: ``sum_m w_m g_i^T (H_m + damping I)^{-1} g_i``."""
        self._check_fitted()
        if self.hessian is not None:
            return self._reduce(_hessian_self_influence(self, self.hessian), reduce)
        rows = self._sqnorms * self.member_weights[:, None]
        return self._reduce(rows, reduce)

    @property
    def hessian_report_(self) -> dict[str, dict]:
        """Per member, what the Hessian comparator did on its last solve
        (iterations, relative residual, eigenvalues, ...); empty for the identity."""
        return {} if self.hessian is None else dict(self.hessian.report)

    def target_values(self, target: Target) -> np.ndarray:
        """The target f at each member, ``(n_members,)`` in target units."""
        self._check_fitted()
        target.validate(self.task)
        return np.array([target.value(view) for _, view in self._views()])
