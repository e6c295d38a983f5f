"""What users pass in: model outputs, batch shapes, dtypes, data containers,
labels and loader orders. Each case is checked against an explicit computation
(the same data in the plain tensor form, or the loss written out by hand), or
must raise a named error before any gradient is taken."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EmbedBag, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfree as hf
from hessfree.errors import DataError, HessfreeError, LabelError


def _data(n=12, d=5, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _ref_self_influence(model, loss_of_one, n):
    """sum over parameters of ||grad l_i||^2 by a plain autograd loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(n):
        grads = torch.autograd.grad(loss_of_one(i), params)
        out.append(sum(float(g.double().pow(2).sum()) for g in grads))
    return np.array(out)


# ---- 6: transformers ModelOutput and dict outputs ------------------------------------------------------------------


def _tiny_bert(num_labels=3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _bert_batch(n=5, t=7):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 1, 0])}


def test_bert_model_output_is_read_as_logits_and_labels_stay_out_of_forward():
    model = _tiny_bert()
    batch = _bert_batch()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    task = hf.ClassificationTask(model)
    losses = task.per_example_loss(model, batch)
    assert seen[-1] == ["attention_mask", "input_ids"]  # the labels are never passed to forward
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(losses.detach(), ref, rtol=1e-6, atol=1e-7)

    est = hf.Influence(task, params="classifier").fit(batch)
    names = ["classifier.weight", "classifier.bias"]
    for p_name, p in model.named_parameters():
        p.requires_grad_(p_name in names)

    def loss_of_one(i):
        out = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]).logits
        return F.cross_entropy(out, batch["labels"][i : i + 1])

    np.testing.assert_allclose(est.self_influence(), _ref_self_influence(model, loss_of_one, 5), rtol=1e-4)


class DictOut(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, n_out)

    def forward(self, x):
        return {"logits": self.lin(x), "hidden": x}


def test_dict_outputs_with_logits_for_classification_regression_and_a_custom_loss():
    x, y = _data()
    cls = DictOut(3)
    torch.testing.assert_close(
        hf.ClassificationTask(cls).per_example_loss(cls, (x, y)).detach(),
        F.cross_entropy(cls.lin(x), y, reduction="none").detach(),
    )
    reg = DictOut(2)
    yr = torch.randn(12, 2)
    torch.testing.assert_close(
        hf.RegressionTask(reg).per_example_loss(reg, (x, yr)).detach(), (reg.lin(x) - yr).pow(2).mean(1).detach()
    )
    task = hf.Task(cls, loss_fn=lambda out, lab: F.cross_entropy(out, lab, reduction="none"))
    torch.testing.assert_close(
        task.per_example_loss(cls, (x, y)).detach(), F.cross_entropy(cls.lin(x), y, reduction="none").detach()
    )


def test_a_tuple_output_is_refused_by_name():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return x.sum(1), self.lin(x)

    x, y = _data()
    with pytest.raises(HessfreeError, match=r"returned a tuple of 2.*Override Task\.forward"):
        hf.ClassificationTask(TupleOut()).per_example_loss(TupleOut(), (x, y))


# ---- 7: a forward that ends in .squeeze() --------------------------------------------------------------------------


class Squeezed(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(5, n_out)

    def forward(self, x):
        return self.lin(x).squeeze()


@pytest.mark.parametrize("n_out", [1, 3])
def test_squeezed_outputs_give_the_explicit_cross_entropy(n_out):
    model = Squeezed(n_out)
    task = hf.ClassificationTask(model)
    for b in (1, 4):
        x, y = _data(n=b, k=max(n_out, 2), seed=b)
        logits = model.lin(x).detach()
        if n_out == 1:
            ref = F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")
            p_ref = torch.stack([1 - torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 0])], 1)
        else:
            ref = F.cross_entropy(logits, y, reduction="none")
            p_ref = torch.softmax(logits, 1)
        torch.testing.assert_close(task.per_example_loss(model, (x, y)).detach(), ref)
        torch.testing.assert_close(task.probabilities(task.forward(model, (x, y))).detach(), p_ref)


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_squeezed_model_scores_equal_the_unsqueezed_model(engine):
    x, y = _data(n=9)
    model = Squeezed(3)
    plain = nn.Sequential(model.lin)
    want = hf.Influence(hf.ClassificationTask(plain), batch_size=4).fit((x, y)).self_influence()
    got = hf.Influence(hf.ClassificationTask(model), batch_size=4, engine=engine).fit((x, y)).self_influence()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the last forward-only batch holds one example
    probs = hf.output_space.member_probabilities(hf.ClassificationTask(model), (x, y), batch_size=4)
    np.testing.assert_allclose(probs, torch.softmax(model.lin(x), 1).detach().numpy(), rtol=1e-5)


# ---- 8: input dtypes are cast to the model's -----------------------------------------------------------------------


def test_float64_numpy_into_a_float32_model_equals_float32_tensors():
    x, y = _data()
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    want = hf.Influence(task).fit((x, y)).self_influence()
    got = hf.Influence(task).fit((x.double().numpy(), y.numpy())).self_influence()
    np.testing.assert_array_equal(got, want)


def test_float32_into_a_float64_model_and_float32_into_bfloat16():
    x, y = _data()
    task = hf.ClassificationTask(mlp(dtype=torch.float64))
    want = hf.Influence(task).fit((x.double(), y)).self_influence()
    np.testing.assert_array_equal(hf.Influence(task).fit((x, y)).self_influence(), want)

    bf = mlp(dtype=torch.bfloat16)
    got = hf.ClassificationTask(bf).per_example_loss(bf, (x, y))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.cross_entropy(bf(x.bfloat16()), y, reduction="none"))

    # integer inputs (token ids, masks) and labels keep their dtype
    torch.manual_seed(0)
    model = EmbedBag().double()
    ids = torch.randint(0, 20, (6, 4))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(6, 4, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    emb = hf.ClassificationTask(model)
    _, kwargs = emb.inputs(batch)
    assert kwargs["input_ids"].dtype == torch.long and kwargs["attention_mask"].dtype == torch.long
    assert emb.labels(batch).dtype == torch.long
    torch.testing.assert_close(
        emb.per_example_loss(model, batch).detach(),
        F.cross_entropy(model(ids, batch["attention_mask"]), batch["labels"], reduction="none").detach(),
    )


# ---- 9: datasets.Dataset and pandas --------------------------------------------------------------------------------


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x)


def test_hf_dataset_numeric_columns_equal_a_dict_of_tensors():
    datasets = pytest.importorskip("datasets")
    x, y = _data()
    task = hf.ClassificationTask(KwModel())
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")
    want = hf.Influence(task).fit({"x": x, "labels": y}).self_influence()
    np.testing.assert_array_equal(hf.Influence(task).fit(ds).self_influence(), want)
    # the rows the dataset shows (after select) in the order it shows them
    sub = ds.select([3, 1, 4])
    src = hf.DataSource(sub)
    torch.testing.assert_close(src.tensors()["labels"], y[[3, 1, 4]])
    assert len(src) == 3


def test_hf_dataset_string_ragged_and_split_dict_are_refused_by_name():
    datasets = pytest.importorskip("datasets")
    text = datasets.Dataset.from_dict({"x": [[1.0], [2.0]], "labels": [0, 1], "text": ["a b", "c"]})
    with pytest.raises(DataError, match=r"column 'text' holds strings.*remove_columns\(\['text'\]\)"):
        hf.DataSource(text)
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4]], "labels": [0, 1]})
    with pytest.raises(DataError, match=r"column 'input_ids' has rows of different lengths \(1 to 3\).*padding"):
        hf.DataSource(ragged)
    with pytest.raises(DataError, match=r"DatasetDict.*\['train'\]"):
        hf.DataSource(datasets.DatasetDict({"train": text}))


def test_dict_keys_the_model_does_not_take_are_refused_by_name():
    datasets = pytest.importorskip("datasets")
    x, y = _data()
    task = hf.ClassificationTask(KwModel())
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist(), "idx": list(range(len(y)))})
    with pytest.raises(DataError, match=r"keys \['idx'\].*forward has no parameter.*ds.remove_columns\(\['idx'\]\)"):
        hf.Influence(task).fit(ds)
    want = hf.Influence(task).fit({"x": x, "labels": y}).self_influence()
    np.testing.assert_array_equal(hf.Influence(task).fit(ds.remove_columns(["idx"])).self_influence(), want)


class _Force(nn.Module):
    """A force field: its forward differentiates an energy with respect to the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, x):
        x = x.detach().requires_grad_(True)
        return -torch.autograd.grad(self.e(x).sum(), x, create_graph=True)[0]


def test_a_forward_that_differentiates_and_a_task_that_calls_the_model_itself():
    """The first-example check runs with gradients on, and the dict-key check only where the base
    forward passes the keys as keywords; both scores equal a per-example loop."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    model = _Force()
    task = hf.Task(model, loss_fn=lambda out, t: ((out - t) ** 2).sum(1))
    got = hf.Influence(task, engine="loop", batch_size=3).fit((x, y)).self_influence()
    want = []
    for i in range(6):
        model.zero_grad()
        task.per_example_loss(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        want.append(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    np.testing.assert_allclose(got, want, rtol=1e-10)

    class Positional(hf.ClassificationTask):
        def forward(self, model, batch):
            _, kw = self.inputs(batch)  # the dtype cast, then a positional call
            return model(kw["features"])

    data = {"features": torch.randn(8, 5, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 0] * 2)}
    net = mlp()
    got = hf.Influence(Positional(net)).fit(data).self_influence()
    plain = hf.Influence(hf.ClassificationTask(net)).fit((data["features"], data["labels"])).self_influence()
    np.testing.assert_allclose(got, plain, rtol=1e-12)
    with pytest.raises(TypeError, match="train\\[0\\] must be a torch.Tensor.*torch.as_tensor"):
        hf.Influence(hf.ClassificationTask(net)).fit((x.tolist(), y.tolist()))  # (X, y) as plain lists


def test_a_list_of_examples_equals_the_tensors():
    x, y = _data()
    task = hf.ClassificationTask(KwModel())
    want = hf.Influence(task, batch_size=4).fit({"x": x, "labels": y}).self_influence()
    rows = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    np.testing.assert_allclose(hf.Influence(task, batch_size=4).fit(rows).self_influence(), want, rtol=1e-6)
    plain = hf.ClassificationTask(mlp(dtype=torch.float32))
    want = hf.Influence(plain, batch_size=4).fit((x, y)).self_influence()
    pairs = [(x[i].double().numpy(), int(y[i])) for i in range(len(y))]  # numpy float64 rows, int labels
    np.testing.assert_allclose(hf.Influence(plain, batch_size=4).fit(pairs).self_influence(), want, rtol=1e-5)


def test_pandas_frame_and_series_equal_tensors():
    pd = pytest.importorskip("pandas")
    x, y = _data()
    cols = [f"f{i}" for i in range(5)]
    df = pd.DataFrame(x.double().numpy(), columns=cols)
    df["label"] = y.numpy()
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    want = hf.Influence(task).fit((x, y)).self_influence()
    np.testing.assert_array_equal(hf.Influence(task).fit((df[cols], df["label"])).self_influence(), want)
    # integer and bool feature columns, nullable integer labels
    xi = torch.randint(-3, 4, (12, 5))
    ints = pd.DataFrame(xi.numpy(), columns=cols).astype({"f4": bool})
    want = hf.Influence(task).fit((torch.cat([xi[:, :4], (xi[:, 4:] != 0)], 1).float(), y)).self_influence()
    got = hf.Influence(task).fit((ints, pd.Series(y.numpy(), dtype="Int64"))).self_influence()
    np.testing.assert_array_equal(got, want)


def test_pandas_string_labels_are_refused_and_encode_labels_encodes_them():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "label": ["dog", "cat", "eel", "cat"]})
    with pytest.raises(DataError, match=r"'label' has dtype (object|str).*hf\.data\.encode_labels"):
        hf.DataSource((df[["a"]], df["label"]))
    codes, classes = hf.data.encode_labels(df["label"])
    assert classes == ["cat", "dog", "eel"]
    assert codes.dtype == torch.long and codes.tolist() == [1, 0, 2, 0]
    src = hf.DataSource((df[["a"]], codes))
    assert src.tensors()[0].shape == (4, 1)
    with pytest.raises(DataError, match=r"'a' has dtype (object|str)"):
        hf.DataSource((pd.DataFrame({"a": ["x", "y"]}), torch.tensor([0, 1])))
    with pytest.raises(DataError, match=r"value at position 1 is missing"):
        hf.data.encode_labels(["a", None, "b"])


# ---- 10: labels are checked once, before any gradient --------------------------------------------------------------


def test_label_out_of_range_named_before_any_gradient():
    x, y = _data(n=4)
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    bad = torch.tensor([0, 1, 2, 3])
    with pytest.raises(LabelError, match=r"example 3 has label 3, but the model has 3 outputs \(labels 0 to 2\)"):
        task.check_data(hf.DataSource((x, bad)))
    with pytest.raises(LabelError, match=r"example 3 has label 3"):
        hf.Influence(task).fit((x, bad))
    # callers that bypass check_data: the loss and check_batch name it too (not an IndexError)
    with pytest.raises(LabelError, match=r"example 3 of the batch has label 3"):
        task.per_example_loss(task.model, (x, bad))
    with pytest.raises(LabelError, match=r"example 3 of the batch has label 3"):
        task.check_batch((x, bad))
    with pytest.raises(LabelError, match=r"example 0 has label -1"):
        task.check_data(hf.DataSource((x, torch.tensor([-1, 0, 1, 2]))))


def test_binary_one_logit_labels_must_be_0_or_1():
    x, _ = _data(n=4)
    task = hf.ClassificationTask(mlp(n_out=1, dtype=torch.float32))
    with pytest.raises(LabelError, match=r"example 2 has label 2, but the model has one output .*0 or 1"):
        task.check_data(hf.DataSource((x, torch.tensor([0, 1, 2, 0]))))
    with pytest.raises(LabelError, match=r"example 2 of the batch has label 2"):
        task.per_example_loss(task.model, (x, torch.tensor([0, 1, 2, 0])))


def test_fractional_labels_refused_and_column_labels_accepted():
    x, y = _data()
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    with pytest.raises(LabelError, match=r"example 0 has label 0\.7.*integers"):
        task.check_data(hf.DataSource((x, y + 0.7)))
    with pytest.raises(LabelError, match=r"example 0 of the batch has label 0\.7"):
        task.per_example_loss(task.model, (x, y + 0.7))
    want = hf.Influence(task).fit((x, y)).self_influence()
    np.testing.assert_array_equal(hf.Influence(task).fit((x, y[:, None])).self_influence(), want)
    np.testing.assert_array_equal(hf.Influence(task).fit((x, y.double())).self_influence(), want)
    with pytest.raises(LabelError, match=r"labels have shape \(12, 3\).*argmax"):
        task.check_data(hf.DataSource((x, F.one_hot(y, 3))))
    with pytest.raises(LabelError, match=r"example 0 has label 0\.7"):
        hf.apps.find_noisy_labels(task, (x, y + 0.7))


class _Items(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_labels_of_a_loader_are_checked_with_their_index(engine):
    x, y = _data(n=40)
    y[37] = 5
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    # a TensorDataset's labels are read at once, without loading items
    with pytest.raises(LabelError, match=r"example 37 has label 5"):
        task.check_data(hf.DataSource(DataLoader(TensorDataset(x, y), batch_size=8)))
    # any other loader: the batch is checked before its gradients, the index in the data named (37 = 4 * 8 + 5)
    with pytest.raises(LabelError, match=r"^training example 37 has label 5"):
        hf.Influence(task, batch_size=8, engine=engine).fit(DataLoader(_Items(x, y), batch_size=8))
    est = hf.Influence(task, batch_size=8, engine=engine).fit((x[:8], y[:8]))
    with pytest.raises(LabelError, match=r"^test example 37 has label 5"):
        est.pairwise(DataLoader(_Items(x, y), batch_size=8))
    y[37], y[2] = 0, 7
    with pytest.raises(LabelError, match=r"example 2 has label 7"):
        task.check_data(hf.DataSource(DataLoader(_Items(x, y), batch_size=8)))


def test_regression_labels_must_be_finite_and_match_the_output_width():
    x, _ = _data()
    yr = torch.randn(12, 3)
    yr[5, 1] = float("nan")
    task = hf.RegressionTask(nn.Linear(5, 3))
    with pytest.raises(LabelError, match=r"example 5 has a label that is not finite"):
        task.check_data(hf.DataSource((x, yr)))
    one = hf.RegressionTask(nn.Linear(5, 1))
    with pytest.raises(LabelError, match=r"3 values per example.*1 output"):
        one.per_example_loss(one.model, (x, torch.randn(12, 3)))


# ---- 11: loaders must yield examples 0..n-1 in order ---------------------------------------------------------------


def test_loader_with_an_out_of_order_batch_sampler_is_refused():
    x, y = _data()
    ds = TensorDataset(x, y)
    order = [[5, 2, 9], [0, 11, 7], [1, 3, 4], [6, 8, 10]]
    with pytest.raises(DataError, match=r"yields example 5 at position 0.*shuffle=False"):
        hf.DataSource(DataLoader(ds, batch_sampler=order))
    with pytest.raises(DataError, match=r"yields example 11 at position 0"):
        hf.DataSource(DataLoader(ds, sampler=list(reversed(range(12))), batch_size=4))
    with pytest.raises(DataError, match=r"yields 6 of the 12 examples"):
        hf.DataSource(DataLoader(ds, sampler=list(range(6)), batch_size=4))
    # a custom batch sampler that does yield 0..n-1 in order (variable batch sizes) keeps working
    task = hf.ClassificationTask(mlp(dtype=torch.float32))
    want = hf.Influence(task).fit((x, y)).self_influence()
    loader = DataLoader(ds, batch_sampler=[[0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 10, 11]])
    np.testing.assert_allclose(hf.Influence(task).fit(loader).self_influence(), want, rtol=1e-6)


# ---- 14: noisy labels, classes too small to centre -----------------------------------------------------------------


def test_singleton_class_is_not_centred_and_is_reported():
    from hessfree.apps import find_noisy_labels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.5]]))
        model.bias.zero_()
    y = model(x).argmax(1)
    y[y == 2] = 0  # classes 0 and 1 only ...
    x[7] = torch.tensor([3.0, 0.0])  # ... and one example that is clearly class 0, labelled 2
    y[7] = 2
    task = hf.ClassificationTask(model)
    raw = hf.output_space.output_self_influence(task, (x, y))
    assert int(np.argmax(raw)) == 7
    report = find_noisy_labels(task, (x, y), method="self")
    assert report.index[0] == 7
    from hessfree.apps.noisy_labels import MIN_CENTRED_CLASS

    assert report.uncentred_classes == [2]
    assert "class 2" in report.summary() and "not centred" in report.summary()
    s = report.suspicion()
    assert s[7] == raw[7]
    yn = y.numpy()
    for c in (0, 1):
        np.testing.assert_allclose(s[yn == c], raw[yn == c] - np.median(raw[yn == c]))
    # a class with MIN_CENTRED_CLASS - 1 examples is left as it is too
    small = torch.nonzero(y == 0).flatten()[: MIN_CENTRED_CLASS - 1]
    y2 = y.clone()
    y2[7] = 0
    keep = torch.cat([torch.nonzero(y2 == 1).flatten(), small])
    rep2 = find_noisy_labels(task, (x[keep], y2[keep]), method="self")
    assert rep2.uncentred_classes == [0]


def test_predict_and_accuracy_take_float64_numpy_into_a_float32_model():
    import numpy as np

    from hessfree.training import accuracy, predict

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = np.random.default_rng(0).normal(size=(9, 3))  # float64, as scikit-learn gives
    expected = model(torch.as_tensor(x, dtype=torch.float32)).argmax(-1)
    assert torch.equal(predict(model, x), expected)
    assert accuracy(model, x, expected) == 1.0
