"""Per-example feature vectors of one member: exact or projected per-example gradients.

:class:`ProjectedFeatures` (the estimator's feature map) turns a batch into
``(B, dim)`` features and maps full gradients (a target gradient, or explicit
per-example gradients in tests) through the very same matrices, so
``features(batch)[i] . project_flat(g) = P^T grad l(z_i) . P^T g`` exactly, which
is ``grad l(z_i) . g`` without projection and an unbiased estimate of it with one.

Engines (how the per-example gradients are computed; all give the same numbers):

* ``"hooks"``: one batched forward and backward pass; hooks record each layer's
  input and output-gradient and the rules of :mod:`hessfree.gradients.rules` form
  (or, with :class:`~hessfree.projections.Factorized`, project without forming)
  the per-example gradients. Refuses a model with a selected parameter that no
  rule covers (:class:`hessfree.EngineError`, naming the layers).
* ``"auto"``: the hook engine for every parameter with a rule and one backward
  pass per example for the rest (announced once by a warning naming the layers).
* ``"vmap"``: ``torch.func.vmap(grad)``; ``"loop"``: one backward pass per example.

Given a probe batch (the first examples of the training data), the hook and vmap
engines are checked once against the per-example loop: a rule that does not
match (a weight used outside its layer, a layer that mixes examples) moves its
parameters to the loop (``"auto"``) or raises :class:`hessfree.EngineError`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..data import Batch, batch_size_of
from ..errors import EngineError
from ..projections import Dense, Factorized, Projection
from .functional import check_vmappable, per_example_grads, per_example_grads_loop
from .functional import probe_of as probe_of  # re-exported: its earlier home
from .norms import close_to, gradient_norms, hook_sqnorms
from .plan import Plan, Unit, make_plan
from .rules import Unattributable, add_matrix_grads, capture, layer_kind, row_col, vector_grads

ENGINES = ("auto", "hooks", "vmap", "loop")


class ProjectedFeatures:
    """The feature map of one member's module and parameter selection.

    Args:
        projection: ``None`` (exact flat per-example gradients, in ``names``
            order), a :class:`~hessfree.projections.Dense` or a
            :class:`~hessfree.projections.Factorized`.
        view: the member (its module and parameters).
        names: the selected parameter names (the flat-gradient order).
        engine: ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"loop"`` (see the module docstring).
        probe: a batch of the first few training examples; the hook and vmap
            engines are checked on it against the per-example loop.
        checked: parameters a previous check (of the same module) sent to the
            loop, to skip the check; updated in place by this one.

    Raises:
        EngineError: the forced engine cannot handle the model (the message names
            the layers and an engine that works).
    """

    def __init__(self, projection: Projection | None, view, names: list[str], engine: str = "auto",
                 probe: Batch | None = None, checked: dict | None = None):  # fmt: skip
        if projection is not None and not isinstance(projection, (Dense, Factorized)):
            raise TypeError(f"projection must be hf.projections.Dense or Factorized, got {type(projection).__name__}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.projection, self.names, self.engine = projection, list(names), engine
        self.shapes = {n: tuple(view.params[n].shape) for n in names}
        self.total = sum(view.params[n].numel() for n in names)
        self._fallback: set[str] = set()
        self._verified: set[str] = set()
        self._clone: set[str] = set()  # layers whose output is changed in place later (see rules.capture)
        self._checks = probe is not None or (checked is not None and "fallback" in checked)
        if checked is not None and "fallback" in checked:
            self._fallback, self._verified = set(checked["fallback"]), set(checked["verified"])
        self._replan(view.module)
        if probe is not None and (checked is None or "fallback" not in checked):
            self._check(view, probe)
            if checked is not None:
                checked.update(fallback=set(self._fallback), verified=set(self._verified))
        if checked is None or not checked.get("announced"):
            if isinstance(projection, Dense) and projection.dim >= self.total:
                warnings.warn(f"hessfree: Dense({projection.dim}) projects {self.total} gradient entries to as many or "
                              "more numbers: projection=None gives the exact gradients, cheaper", stacklevel=4)  # fmt: skip
            self._refuse_or_announce(view)
            if checked is not None:
                checked["announced"] = True

    # ---- planning -----------------------------------------------------------------
    def _replan(self, module: nn.Module) -> None:
        dim = self.projection.dim if isinstance(self.projection, Factorized) else None
        self.plan: Plan = make_plan(module, self.names, dim, self._fallback, self._verified, free=self._checks)
        if isinstance(self.projection, Factorized):
            self.units = self.plan.units
            self.dim = sum(u.k for u in self.units)
        elif isinstance(self.projection, Dense):
            self.units = [Unit("dense", "", list(self.names), 1, self.total, k_rows=1, k_cols=self.projection.dim)]
            self.dim = self.projection.dim
        else:
            self.units = [Unit("dense", "", list(self.names), 1, self.total, k_rows=1, k_cols=self.total)]
            self.dim = self.total

    @property
    def fallback(self) -> list[str]:
        """Parameters whose per-example gradients come from the per-example loop."""
        if self.engine in ("vmap", "loop"):
            return []
        return list(self.plan.fallback)

    @property
    def legacy_layout(self) -> bool:
        """True when the feature layout is the one earlier versions wrote to stores."""
        return not isinstance(self.projection, Factorized) or self.plan.legacy

    def _layers_of(self, names) -> list[str]:
        return sorted({m for n in names for m in self.plan.owners.get(n, [n])})

    def _refuse_or_announce(self, view) -> None:
        rest = self.fallback
        if not rest:
            return
        subs = dict(view.module.named_modules())
        layers = self._layers_of(rest)
        shown = ", ".join(f"{m!r} ({type(subs[m]).__name__})" if m in subs else repr(m) for m in layers[:6])
        more = f" and {len(layers) - 6} more" if len(layers) > 6 else ""
        if self.engine == "hooks":
            raise EngineError(
                f"engine='hooks' has no per-example rule for the parameters of {shown}{more}; "
                "use engine='auto' (hooks plus a per-example loop for those layers) or engine='loop'"
            )
        warnings.warn(
            f"hessfree: no batched per-example rule for {len(rest)} parameter tensor(s) of {shown}{more}; their "
            "gradients are computed by one backward pass per example (about batch_size times the cost of "
            "the hook engine for those layers)",
            stacklevel=4,
        )

    # ---- the check against the per-example loop --------------------------------------
    def _check(self, view, probe: Batch) -> None:
        if self.engine == "loop":
            return
        ref = per_example_grads_loop(view, self.names, probe)
        total = gradient_norms(ref)
        if self.engine == "vmap":
            try:
                got = per_example_grads(view, self.names, probe)
            except Exception as e:  # vmap's own refusals (data-dependent control flow, in-place writes, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EngineError(f"engine='vmap' cannot run this model: {first}; use engine='auto' or 'loop'") from e
            bad = [n for n in self.names if not close_to(got[n], ref[n], total)]
            if bad:
                raise EngineError(
                    f"engine='vmap' disagrees with the per-example loop on {bad[:4]}; use engine='auto' or 'loop'"
                )
            return
        module = view.module
        subs = dict(module.named_modules())
        for m in subs:  # unknown elementwise layers: try their rule, keep it only if it matches
            if layer_kind(subs[m]) == "affine":
                self._verified.add(m)
        for _ in range(5):  # each round moves failing parameters to the loop and plans again
            self._replan(module)
            try:
                got, bad = self._hooked_grads(view, probe)
            except Exception as e:  # the batched pass itself failed
                if self.plan.broadcast:  # per-example copies of a free parameter broke the forward
                    self._fallback |= set(self.plan.broadcast)
                    continue
                if self.engine == "hooks":
                    raise EngineError(
                        f"engine='hooks' cannot run this model ({type(e).__name__}: {e}); use engine='auto' or 'loop'"
                    ) from e
                self._fallback |= set(self.names)
                break
            bad |= {n for n, g in got.items() if not close_to(g, ref[n], total)}
            if not bad:
                return
            self._fallback |= bad
        self._replan(module)

    # ---- per-example gradients ----------------------------------------------------------
    def per_example_grads(self, view, batch: Batch) -> dict[str, torch.Tensor]:
        """Exact per-example gradients ``{name: (B, *shape)}`` by this map's engine."""
        if self.engine == "vmap":
            check_vmappable(batch)
            view.task.check_batch(batch)
            return per_example_grads(view, self.names, batch)
        if self.engine == "loop":
            return per_example_grads_loop(view, self.names, batch)
        grads, bad = self._hooked_grads(view, batch)
        if bad:
            raise EngineError(
                f"the hook engine cannot split the gradients of {sorted(bad)[:4]} by example in this batch "
                "(a layer's tensors have no row per example); use engine='loop'"
            )
        for n, g in per_example_grads_loop(view, self.plan.fallback, batch).items() if self.plan.fallback else ():
            grads[n] = g.to(next(iter(grads.values())).dtype) if grads else g
        return grads

    def _hooked_grads(self, view, batch: Batch) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Per-example gradients of every parameter with a rule (zeros for a layer the
        loss does not reach) and the names whose layer calls could not be split by example."""
        view.task.check_batch(batch)
        b = batch_size_of(batch)
        subs = dict(view.module.named_modules())
        plan = self.plan
        dtype = self._exact_dtype(view)
        out: dict[str, torch.Tensor] = {}
        bad: set[str] = set()
        if plan.batched:
            cap = capture(view, batch, plan.hooked, self.names, plan.broadcast, self._clone)
            out.update({n: g.to(dtype) for n, g in cap.broadcast.items()})
            by_unit = {m: u for u in plan.units for m, _ in u.uses}
            for call in cap.calls:
                mod = subs[call.module]
                try:
                    if call.module in by_unit:
                        u = by_unit[call.module]
                        kind = dict(u.uses)[call.module]
                        if call.grad is not None:
                            add_matrix_grads(out, u, kind, mod, call, b, dtype)
                    if call.module in plan.vector and call.grad is not None:
                        kind, sel = plan.vector[call.module]
                        for n, g in vector_grads(kind, mod, call, b, sel).items():
                            out[n] = out[n] + g.to(dtype) if n in out else g.to(dtype)
                except Unattributable:
                    u = by_unit.get(call.module)
                    bad |= set(u.names if u is not None else []) | set(plan.vector.get(call.module, ("", {}))[1].values())
        for n in self.names:
            if n not in out and n not in plan.fallback:
                out[n] = torch.zeros(b, *self.shapes[n], dtype=dtype, device=view.params[n].device)
        return {n: g for n, g in out.items() if n not in bad}, bad

    def _exact_dtype(self, view) -> torch.dtype:
        """Arithmetic dtype of exact per-example gradients: fp64 models keep fp64, others fp32."""
        return torch.float64 if view.params[self.names[0]].dtype == torch.float64 else torch.float32

    # ---- matrices ------------------------------------------------------------------
    def _dense(self, unit: Unit) -> Dense | None:
        if isinstance(self.projection, Dense):
            return self.projection
        if unit.k >= unit.numel:
            return None
        return Dense(unit.k_cols, kind=self.projection.kind, seed=self.projection.seed)

    def _factors(self, unit: Unit, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        p = self.projection
        return (
            p.factor(f"{unit.module}/rows", unit.rows, unit.k_rows, device),
            p.factor(f"{unit.module}/cols", unit.cols, unit.k_cols, device),
        )

    # ---- full gradients -> features ---------------------------------------------------
    def _flat(self, grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        b = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(b, -1) for n in names], dim=1)

    def project_grads(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Map full gradients ``{name: (B, *param.shape)}`` -> ``(B, dim)`` (fp32 with a
        projection; the gradients' own dtype, flat in ``names`` order, without)."""
        if self.projection is None:
            return self._flat(grads, self.names)
        b = next(iter(grads.values())).shape[0]
        parts = []
        for u in self.units:
            if u.kind == "dense":
                dense = self._dense(u)
                if dense is None:
                    parts.append(self._flat(grads, u.names).float())
                else:  # the gradients in pieces: their (B, D) concatenation is never formed
                    parts.append(dense.project([grads[n].reshape(b, -1) for n in u.names], key="fallback"))
                continue
            g = grads[u.weight].float()
            g = (g.transpose(1, 2) if u.kind == "transposed_linear" else g).reshape(b, u.rows, -1)
            if u.bias is not None:
                g = torch.cat([g, grads[u.bias].float().reshape(b, u.rows, 1)], dim=2)
            p_rows, p_cols = self._factors(u, g.device)
            if p_rows is not None:
                g = torch.matmul(p_rows.T, g)
            if p_cols is not None:
                g = torch.matmul(g, p_cols)
            parts.append(g.reshape(b, -1))
        return torch.cat(parts, dim=1)

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Map flat gradients ``(D,)`` -> ``(dim,)`` or ``(B, D)`` -> ``(B, dim)``.

        Raises:
            ValueError: ``D`` is not the number of selected parameters (their
                gradients flattened and concatenated in ``names`` order).
        """
        if flat.dim() not in (1, 2) or flat.shape[-1] != self.total:
            raise ValueError(f"project_flat expects gradients of shape ({self.total},) or (B, {self.total}): the "
                             f"{len(self.names)} selected parameters flattened and concatenated in param_names "
                             f"order; got {tuple(flat.shape)}")  # fmt: skip
        if self.projection is None:
            return flat
        single = flat.dim() == 1
        rows = flat.reshape(1, -1) if single else flat
        grads, start = {}, 0
        for n in self.names:
            size = 1
            for s in self.shapes[n]:
                size *= s
            grads[n] = rows[:, start : start + size].reshape(rows.shape[0], *self.shapes[n])
            start += size
        out = self.project_grads(grads)
        return out[0] if single else out

    # ---- per-example features of a batch ---------------------------------------------
    def features(self, view, batch: Batch) -> torch.Tensor:
        """Per-example features of ``batch``, ``(B, dim)``: fp32 with a projection,
        the model's dtype (fp32 for half precision) without."""
        if not isinstance(self.projection, Factorized) or self.engine in ("vmap", "loop"):
            grads = self.per_example_grads(view, batch)
            if self.projection is None:
                return self._flat({n: g if g.dtype == torch.float64 else g.float() for n, g in grads.items()}, self.names)
            return self.project_grads(grads)
        return self._factorized(view, batch)

    def _factorized(self, view, batch: Batch) -> torch.Tensor:
        """Each layer's block written in place into one preallocated output; no
        per-example gradient of a matrix layer is formed."""
        view.task.check_batch(batch)
        b = batch_size_of(batch)
        plan = self.plan
        out = torch.zeros(b, self.dim, device=view.params[self.names[0]].device)
        starts = [0]
        for u in self.units:
            starts.append(starts[-1] + u.k)
        index = {id(u): i for i, u in enumerate(self.units)}
        subs = dict(view.module.named_modules())
        by_unit = {m: u for u in self.units for m, _ in u.uses}
        rest: dict[str, torch.Tensor] = {}
        if plan.batched:
            cap = capture(view, batch, plan.hooked, self.names, plan.broadcast, self._clone)
            rest.update({n: g.float() for n, g in cap.broadcast.items()})
            for call in cap.calls:
                if call.grad is None:
                    continue
                mod = subs[call.module]
                u = by_unit.get(call.module)
                if u is not None:
                    i = index[id(u)]
                    p_rows, p_cols = self._factors(u, call.grad.device)
                    r, c = row_col(dict(u.uses)[call.module], mod, call, b, p_rows, p_cols, u.bias is not None)
                    block = out[:, starts[i] : starts[i + 1]].view(b, u.k_rows, u.k_cols)  # strided view
                    block.baddbmm_(r.transpose(1, 2), c)
                if call.module in plan.vector:
                    kind, sel = plan.vector[call.module]
                    for n, g in vector_grads(kind, mod, call, b, sel).items():
                        rest[n] = rest[n] + g.float() if n in rest else g.float()
        dense = [u for u in self.units if u.kind == "dense"]
        if dense:
            if plan.fallback:
                rest.update({n: g.float() for n, g in per_example_grads_loop(view, plan.fallback, batch).items()})
            u = dense[0]
            i = index[id(u)]
            flat = torch.cat([rest[n].reshape(b, -1) if n in rest else out.new_zeros(b, view.params[n].numel())
                              for n in u.names], dim=1)  # fmt: skip
            proj = self._dense(u)
            out[:, starts[i] : starts[i + 1]] = flat if proj is None else proj.project(flat, key="fallback")
        return out

    @property
    def exact(self) -> bool:
        """True when nothing is projected (no projection, or ``Factorized(None)`` /
        layers within their share)."""
        if self.projection is None:
            return True
        return all(u.k == u.numel for u in self.units) and not isinstance(self.projection, Dense)

    def sqnorms(self, view, batch: Batch) -> torch.Tensor:
        """Exact squared per-example gradient norms ``(B,)`` (exact maps only); for
        single-call matrix layers without forming the gradients:
        ``||sum_t r_t c_t^T||^2 = sum_{t,s} (r_t . r_s)(c_t . c_s)``."""
        if not self.exact:
            raise ValueError("sqnorms without features needs an exact feature map (no projection or Factorized(None))")
        if self.engine in ("vmap", "loop") or not self.plan.batched:
            f = self.features(view, batch)
            return torch.einsum("bd,bd->b", f, f).double().cpu()
        features = lambda: self.features(view, batch)  # noqa: E731
        return hook_sqnorms(view, batch, self.plan, self.names, self._clone, self._exact_dtype(view), features)
