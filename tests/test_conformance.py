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

import functools
import re

import _models
import pytest
import torch
from _models import EITHER, EQUAL, REFUSE
from torch.utils.data import DataLoader

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
# exact features at batch sizes 1 and 4 over 6-8 examples (the last batch of 4 is smaller); the projection at 4
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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: intra-op threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_refusal(err: EngineError, c: _models.Case, engine: str) -> None:
    message = str(err)
    others = [e for e in ENGINES if e != engine]
    assert any(re.search(rf"\b{e}\b", message) for e in others), f"the refusal names no engine that works: {message}"
    module = c.refusal_names.get(engine)
    if module:
        assert module in message, f"the refusal does not name the module {module!r}: {message}"


def run_engine(c: _models.Case, engine: str, run):
    """``run()`` when ``engine`` must or may handle the case; ``None`` after a refusal it is allowed."""
    expectation = c.expectation(engine)
    if expectation == REFUSE:
        with pytest.raises(EngineError) as info:
            run()
        check_refusal(info.value, c, engine)
        return None
    try:
        return run()
    except EngineError as err:
        if expectation == EQUAL:
            raise AssertionError(f"engine={engine!r} refused a model it must handle: {err}") from err
        assert expectation == EITHER
        check_refusal(err, c, engine)
        return None


@pytest.mark.parametrize(("model", "engine", "proj", "batch_size"), MATRIX)
def test_features_equal_the_per_example_loop(model, engine, proj, batch_size):
    c = _models.case(model)

    def run():
        est = hf.Influence(
            c.task, params=c.params, engine=engine, projection=PROJECTIONS[proj](), batch_size=batch_size
        )
        est.fit(c.train)
        return est, est.features(c.train)

    result = run_engine(c, engine, run)
    if result is None:
        return
    est, feats = result
    ref = _models.reference(model)
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
    # one flat gradient of shape (D,) maps to the same row
    single = fmap.project_flat(ref[0])
    assert single.shape == (feats.shape[1],)
    assert_rows_close(single[None], expected[:1], rtol=1e-6)


DICT_CASES = [name for name in _models.BUILDERS if name in _models.HF_CASES and name != "vit"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", DICT_CASES)
def test_features_of_a_loader_that_pads_each_batch(model, engine):
    """Dict examples of different lengths through a DataLoader whose collator pads each batch to its own longest
    example (batches of 4: the first is padded, the last is shorter than the rest)."""
    c = _models.case(model)
    rows = [{k: v[0] for k, v in example.items()} for example in c.examples]
    loader = DataLoader(rows, batch_size=4, shuffle=False, collate_fn=functools.partial(_models.pad_dict, pad=c.pad))

    def run():
        est = hf.Influence(c.task, params=c.params, engine=engine)
        est.fit(loader)
        return est.features(loader)

    feats = run_engine(c, engine, run)
    if feats is not None:
        assert_rows_close(feats, _models.reference(model))
