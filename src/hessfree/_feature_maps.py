"""The estimator's feature maps: per-example (projected) gradients of each member.

:class:`FeatureMaps` is inherited by :class:`hessfree.Influence`: one
:class:`~hessfree.gradients.projected.ProjectedFeatures` per member, built and
checked once, the public ``feature_map`` / ``features`` / ``param_names`` /
``feature_dim``, and the finite-checked stream of feature blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._store_writer import same_data_on_every_rank
from .data import DataSource, slice_batch, to_device
from .errors import DataError, at_offset
from .gradients.projected import ProjectedFeatures
from .members import MemberView


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic for fp32/fp16/bf16 models; fp64 models keep fp64."""
    return t if t.dtype == torch.float64 else t.float()


class FeatureMaps:
    # ---- features (per-example gradients; projection plugs in here) ------------
    def _features(self, view: MemberView, names: list[str], batch) -> torch.Tensor:
        """Per-example feature vectors ``(B, D)`` whose inner products give scores."""
        return _compute_dtype(self._engine(view, names).features(view, batch))

    def _engine(self, view: MemberView, names: list[str]) -> ProjectedFeatures:
        """The feature map of ``view``'s member (built, and checked on the probe, once)."""
        m = view.member_index
        if m not in self._engines:
            proj = self._member_projections[m] if self._member_projections else None
            checked = self._checked.setdefault((id(view.module), tuple(names)), {})
            self._engines[m] = ProjectedFeatures(proj, view, names, self.engine, self._probe, checked)
        return self._engines[m]

    _feature_map = _engine

    def _train_weights(self) -> np.ndarray | None:
        """The training examples' sample weights ``(n,)`` float64, or ``None`` for unweighted
        data (the probe, the first training examples, has no weights); read once per ``fit``
        (whole, or batch by batch from a loader: then the data are loaded once more).

        Raises:
            ValueError: the store's data are weighted and were not passed (``fit()``).
        """
        source = getattr(self, "source", None)
        cached = getattr(self, "_weights_cache", None)
        if cached is not None and cached[0] is source:
            return cached[1]
        if self.task.weights(self._probe) is None:
            w = None
        elif source is None:
            raise ValueError("the stored training data have sample weights, which the Fisher of the weighted loss "
                             "needs, and the store was reopened without them; pass the data: est.fit(train)")  # fmt: skip
        else:
            every = source.tensors_without_loading()
            parts = [self.task.weights(every)] if every is not None else [self.task.weights(b) for b in source]
            if any(p is None for p in parts):
                raise ValueError("some training batches have sample weights and others none; give every example one")
            w = torch.cat([p.reshape(-1) for p in parts]).double().cpu().numpy()
        self._weights_cache = (source, w)
        return w

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
        return self._member_features(data, member, query=False)

    def _member_features(self, data: Any, member: int, query: bool) -> torch.Tensor:
        """The features of ``data`` at ``member`` (one pass over the members, on the CPU);
        with ``query=True`` mapped through the query transform (:meth:`query_features`)."""
        self._check_fitted()
        source = DataSource(data, batch_size=self.batch_size, name="data")
        for m, view in self._views():
            if m == member:
                feats = torch.cat([f.cpu() for _, f in self._featurize(view, self._names[m], source, "data")])
                return self._query_rows(view, self._names[m], feats.to(self.device)).cpu() if query else feats
        raise IndexError(f"member={member} is out of range: the estimator has {len(self._specs)} members")

    def _featurize(self, view: MemberView, names: list[str], source: DataSource, what: str, bar=None, shard: bool = False):
        batches = self._own_batches(source) if shard else source.batches()
        for offset, batch in batches:
            batch = to_device(batch, self.device)
            if offset == 0 and what != "training":  # the training data was checked by fit
                self.task.check_runs(slice_batch(batch, 0, 1), what)
                if what == "test":  # pairwise / top_k, collective calls: the same test data on every rank
                    same_data_on_every_rank(source, "test data")
            try:
                if what == "training" and self.train_map is not None:  # e.g. optimizer-aware directions
                    feats = _compute_dtype(self.train_map(self._engine(view, names), view, batch))
                else:
                    feats = self._features(view, names, batch)
            except DataError as err:  # a row of this batch: name its index in the data
                raise at_offset(err, offset, what) from None
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
