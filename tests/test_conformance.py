"""Per-example gradients are right on every model and every input format users
bring, with every engine and projection, or the forced engine refuses by name.

The reference for every case is a plain autograd loop over the unpadded examples,
each alone as a batch of one (tests/_models.py builds the models, the data and
the reference). Each (model, engine, projection, batch size) is its own test.

* ``projection=None``: the features are the flat per-example gradients;
* ``Factorized(None)``: an exact re-layout of them (``feature_map`` maps the
  reference into it, and inner products are those of the reference);
* ``Factorized(64)``: a random projection, with the same matrices for the
  training features and for ``feature_map(0).project_flat``.

fp32 models throughout: the engines agree with the loop to about 1e-7 relative
(fp32 roundoff in tiny models), so the bound of 1e-4 relative per example leaves
a wide margin while any real error (a missing term, a row of another example, a
padded position that leaks) is far above it.
"""

from __future__ import annotations

import re

import _models
import pytest
import torch
from _models import EITHER, EQUAL, REFUSE

import hessfree as hf
from hessfree.errors import EngineError

pytest.importorskip("transformers")
pytest.importorskip("peft")

RTOL = 1e-4
ENGINES = ("auto", "hooks", "vmap", "loop")
PROJECTIONS = {
    "none": lambda: None,
    "exact": lambda: hf.projections.Factorized(None),
    "k64": lambda: hf.projections.Factorized(64, seed=3),
}
# exact features at batch sizes 1 and 4 (6-8 examples: the last batch is smaller); the projection at 4
BATCH_SIZES = {"none": (1, 4), "exact": (1, 4), "k64": (4,)}

MATRIX = [
    pytest.param(model, engine, proj, b, id=f"{model}-{engine}-{proj}-B{b}")
    for model in _models.BUILDERS
    for engine in ENGINES
    for proj in PROJECTIONS
    for b in BATCH_SIZES[proj]
]


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Every row within ``rtol`` of its expected row, relative to that row's norm."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.norm(dim=1)
    assert (scale > 0).all(), "a reference row is zero: the case does not test that example"
    rel = (a - e).norm(dim=1) / scale
    worst = int(rel.argmax())
    assert rel.max() <= rtol, (
        f"example {worst}: relative error {float(rel[worst]):.3g} > {rtol:g} (all: {rel.tolist()})"
    )


def names_another_engine(message: str, forced: str) -> bool:
    return any(re.search(rf"\b{e}\b", message) for e in ENGINES if e != forced)


def fit_and_featurize(c: _models.Case, engine: str, projection, batch_size: int):
    est = hf.Influence(c.task, params=c.params, engine=engine, projection=projection, batch_size=batch_size)
    est.fit(c.train)
    return est, est.features(c.train)


@pytest.mark.parametrize(("model", "engine", "proj", "batch_size"), MATRIX)
def test_features_equal_the_per_example_loop(model, engine, proj, batch_size):
    c = _models.case(model)
    expectation = c.expectation(engine)
    if expectation == REFUSE:
        with pytest.raises(EngineError) as info:
            fit_and_featurize(c, engine, PROJECTIONS[proj](), batch_size)
        message = str(info.value)
        assert names_another_engine(message, engine), f"the refusal names no engine that works: {message}"
        if c.refusal_names:
            assert c.refusal_names in message, f"the refusal does not name {c.refusal_names!r}: {message}"
        return

    ref = _models.reference(model)
    try:
        est, feats = fit_and_featurize(c, engine, PROJECTIONS[proj](), batch_size)
    except EngineError as err:
        if expectation == EQUAL:
            raise AssertionError(f"engine={engine!r} refused a model it must handle: {err}") from err
        assert expectation == EITHER
        assert names_another_engine(str(err), engine), f"the refusal names no engine that works: {err}"
        return

    assert est.param_names(0) == c.names
    fmap = est.feature_map(0)
    with torch.no_grad():
        expected = fmap.project_flat(ref)
    assert feats.shape == (len(c.examples), est.feature_dim[0])
    if proj == "none":  # the features are the flat gradients, and the map is the identity
        assert_rows_close(feats, ref)
        assert_rows_close(expected, ref, rtol=1e-6)
    elif proj == "exact":  # a re-layout: all the numbers, the same inner products
        assert feats.shape[1] == ref.shape[1]
        assert_rows_close(feats, expected)
        gram = ref.double() @ ref.double().T
        torch.testing.assert_close(
            feats.double() @ feats.double().T, gram, rtol=RTOL, atol=RTOL * float(gram.abs().max())
        )
    else:
        assert feats.shape[1] <= 64
        assert_rows_close(feats, expected)
    # the training features stored by fit: their squared norms are the self-influences
    self_inf = torch.from_numpy(est.self_influence())
    torch.testing.assert_close(self_inf, expected.double().pow(2).sum(1), rtol=3 * RTOL, atol=0)
    # the single-example path (a batch of one, no padding) agrees as well
    single = fmap.project_flat(ref[0])
    assert single.shape == (feats.shape[1],)
    assert_rows_close(single[None], expected[:1], rtol=1e-6)
