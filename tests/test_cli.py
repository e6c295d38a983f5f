"""The application commands on tiny CSV files: every row scored under its own row
number and label, printed tables that match the JSON, flags that change what is
computed. Numbers are checked against computations made here (csv module,
scikit-learn metrics), not against the command's own helpers."""

from __future__ import annotations

import csv as csv_module
import importlib.util
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import hessfree as hf
from hessfree.cli import app

runner = CliRunner()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="CSV input needs pandas")


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _rows(path):
    with open(path, newline="") as f:
        return list(csv_module.DictReader(f))


def _blobs_csv(path, n=120, flips=(3, 17, 40, 41, 77, 90, 101, 118), seed=0):
    """Two well separated classes 'cat' / 'dog'; the rows in ``flips`` carry the other label."""
    rng = np.random.default_rng(seed)
    c = np.arange(n) % 2
    x = rng.normal(size=(n, 3)) + 3.0 * c[:, None]
    true = np.where(c == 1, "dog", "cat")
    given = true.copy()
    given[list(flips)] = np.where(c[list(flips)] == 1, "cat", "dog")
    lines = ["f1,f2,f3,animal"] + [f"{a:.4f},{b:.4f},{d:.4f},{g}" for (a, b, d), g in zip(x, given)]
    path.write_text("\n".join(lines) + "\n")
    return path, true, np.isin(np.arange(n), flips)


def test_noisy_labels_scores_every_csv_row_under_its_row_number_and_label(tmp_path):
    path, true, planted = _blobs_csv(tmp_path / "pets.csv")
    out = tmp_path / "n"
    _ok(["noisy-labels", "--csv", path, "--label", "animal", "--epochs", 4, "--out", out])
    p = json.loads((out / "noisy_labels.json").read_text())
    file_rows = _rows(path)
    t = p["table"]
    # every data row of the file, once, under its own number
    assert sorted(t["row"]) == list(range(len(file_rows))) and p["n_rows_scored"] == len(file_rows)
    # the given label of each output row is the file's label of that row, as written
    assert [file_rows[r]["animal"] for r in t["row"]] == t["given_label"]
    assert set(t["suggested_label"]) <= {"cat", "dog"}
    assert p["labels"]["codes"] == {"cat": 0, "dog": 1}
    assert "row 0 is the first line after the header" in p["row_numbering"]
    # the default method scores in output space: no weight-space estimator to describe
    assert p["method"] == "auto -> self" and p["estimator"] is None
    # a weight-space method: the options of the estimator behind the scores, as hf.InfluenceArguments writes them
    _ok(["noisy-labels", "--csv", path, "--label", "animal", "--epochs", 4, "--method", "self_weights", "--out", out])
    est = json.loads((out / "noisy_labels.json").read_text())["estimator"]
    assert est["hessian"] == "identity" and est["projection"] is None and "Checkpoints" in est["members"]
    assert hf.InfluenceArguments.from_dict({k: v for k, v in est.items() if k != "members"}).engine == est["engine"]
    # the planted wrong labels are the ones found, by CSV row (scikit-learn's AUC over the file's rows)
    score_by_row = np.empty(len(file_rows))
    score_by_row[t["row"]] = t["score"]
    assert roc_auc_score(planted, score_by_row) > 0.95
    suggested_by_row = dict(zip(t["row"], t["suggested_label"]))
    assert np.mean([suggested_by_row[r] == true[r] for r in np.flatnonzero(planted)]) >= 0.75
    assert p["args"]["csv"] == str(path) and p["args"]["epochs"] == 4 and p["args"]["folds"] == 1


def test_noisy_labels_cross_fitting_scores_every_row_too(tmp_path):
    path, _, planted = _blobs_csv(tmp_path / "pets.csv")
    out = tmp_path / "n"
    _ok(["noisy-labels", "--csv", path, "--label", "animal", "--epochs", 4, "--folds", 3, "--out", out])
    p = json.loads((out / "noisy_labels.json").read_text())
    assert sorted(p["table"]["row"]) == list(range(120)) and "3-fold cross-fitting" in p["scheme"]
    score_by_row = np.empty(120)
    score_by_row[p["table"]["row"]] = p["table"]["score"]
    assert roc_auc_score(planted, score_by_row) > 0.95


def test_noisy_labels_noise_flag_flips_rows_and_reports_them(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "n"
    _ok(["noisy-labels", "--data", "digits", "--n-train", 300, "--noise", 0.2, "--epochs", 3, "--out", out])
    p = json.loads((out / "noisy_labels.json").read_text())
    t, d = p["table"], p["detection"]
    truth = load_digits().target
    rows = np.asarray(t["row"])
    assert len(rows) == 300 and len(set(rows)) == 300
    flipped = np.isin(rows, d["flipped_rows"])
    assert flipped.sum() == 60
    # a flipped row's given label differs from the data set's label, every other row's equals it
    given = np.asarray(t["given_label"])
    assert np.all(given[flipped] != truth[rows[flipped]]) and np.all(given[~flipped] == truth[rows[~flipped]])
    assert d["roc_auc"] == pytest.approx(roc_auc_score(flipped, t["score"]))


def test_noisy_labels_prints_the_suspects_and_marks_the_cut_off(tmp_path, monkeypatch):
    from hessfree.apps import commands

    figures = []
    monkeypatch.setattr(commands, "save_figure", lambda fig, out, name: figures.append(fig) or out / name)
    path, _, _ = _blobs_csv(tmp_path / "pets.csv")
    out = tmp_path / "n"
    result = _ok(["noisy-labels", "--csv", path, "--label", "animal", "--epochs", 4, "--top", 0.25, "--show", 40, "--out", out])
    p = json.loads((out / "noisy_labels.json").read_text())
    assert p["n_flagged"] == 30 and len(p["flagged"]) == 30
    assert p["cutoff_score"] == min(r["score"] for r in p["flagged"])
    # each flagged row is a table line with its row number, given label, suggested label and score
    lines = result.stdout.splitlines()
    for rank, r in enumerate(p["flagged"][:10], start=1):
        cells = [c.strip() for c in next(ln for ln in lines if ln.strip("│ ").startswith(f"{rank} ")).split("│")[1:-1]]
        assert cells[1] == str(r["row"]) and cells[2] == r["given_label"] and cells[3].startswith(r["suggested_label"])
        assert float(cells[4]) == pytest.approx(r["score"], rel=1e-3)
    # 25% flagged from 8 planted flips: most flagged rows keep their label, and the output says what that means
    same = sum(r["suggested_equals_given"] for r in p["flagged"])
    assert same >= 15 and f"{same} flagged rows have a suggested label equal to the given one" in result.stdout
    # the histogram marks the cut-off with a vertical line at that score
    (ax,) = figures[0].axes
    assert any(np.allclose(line.get_xdata(), p["cutoff_score"]) for line in ax.lines)


def _loans_csv(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    grp = rng.choice(["a", "b"], size=n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    colour = rng.choice(["red", "blue"], size=n)
    y = np.where((x1 + 0.8 * (grp == "a") + 0.3 * rng.normal(size=n)) > 0.4, "approve", "deny")
    lines = ["x1,x2,colour,grp,outcome"] + [f"{a:.4f},{b:.4f},{c},{g},{t}" for a, b, c, g, t in zip(x1, x2, colour, grp, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fairness_needs_the_favourable_label_and_prints_the_random_baseline(tmp_path):
    path = _loans_csv(tmp_path / "loans.csv")
    out = tmp_path / "f"
    base = ["fairness", "--csv", path, "--label", "outcome", "--group", "grp", "--epochs", 3, "--fractions", "0.05,0.1", "--out", out]
    refused = runner.invoke(app, [str(a) for a in base])
    assert refused.exit_code == 2 and "--favourable is needed" in refused.stderr and "'approve', 'deny'" in refused.stderr
    assert not (out / "fairness.json").exists()
    result = _ok([*base, "--favourable", "approve"])
    p = json.loads((out / "fairness.json").read_text())
    # 'approve' sorts first: its code is 0, and the command says which label it treats as favourable
    assert p["labels"]["favourable"] == "approve" and p["labels"]["favourable_code"] == 0
    assert "favourable label: 'approve' (--favourable)" in result.stdout
    assert [q["fraction"] for q in p["influence"]["curve"]] == [0.05, 0.1] == [q["fraction"] for q in p["random"]["curve"]]
    # the best point (smallest gap below the start within 1 point of accuracy), found here from the curve, is printed
    # with random removal beside it
    ok = [q for q in p["influence"]["curve"] if q["accuracy"] >= p["acc_before"] - 0.01 - 1e-6 and q["gap"] < p["gap_before"]]
    if ok:
        best = min(ok, key=lambda q: q["gap"])
        rnd = next(q for q in p["random"]["curve"] if q["fraction"] == best["fraction"])
        assert (f"-> {best['gap']:.3f} at {best['fraction']:.0%}" in result.stdout
                and f"random removal at {best['fraction']:.0%}: gap {rnd['gap']:.3f}" in result.stdout)  # fmt: skip
    else:
        assert p["best_within_1_point"] is None and "while keeping test accuracy within 1 point" in result.stdout
    # the split rows partition the file, and the arguments are recorded
    parts = p["split_rows"]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == list(range(240))
    assert p["args"]["favourable"] == "approve" and p["args"]["fractions"] == [0.05, 0.1]


def test_defend_prints_clean_and_attacked_accuracy_with_the_attack_strength(tmp_path):
    path = _loans_csv(tmp_path / "loans.csv")
    out = tmp_path / "d"
    result = _ok(["defend", "--csv", path, "--label", "outcome", "--features", "x1,x2,colour", "--model", "mlp", "--eps", 0.3,
                  "--draws", 2, "--epochs", 3, "--out", out])  # fmt: skip
    p = json.loads((out / "defend.json").read_text())
    assert len(p["runs"]) == 4 and all("eps=0.3" in r["attack"] for r in p["runs"])
    assert "eps 0.3" in result.stdout
    # the printed accuracies are the means over the draws of the JSON's runs, in percent
    for strategy, words in (("random", "remove at random"), ("influence", "remove by hessfree")):
        runs = [r for r in p["runs"] if r["strategy"] == strategy]
        clean = 100 * np.mean([r["clean_acc_after"] for r in runs])
        attacked = 100 * np.mean([r["attacked_acc_after"] for r in runs])
        line = next(ln for ln in result.stdout.splitlines() if words in ln)
        assert f"{clean:.1f}%" in line and f"{attacked:.1f}%" in line
        cost = 100 * np.mean([r["clean_acc_after"] - r["clean_acc_before"] for r in runs])
        assert f"{cost:+.1f} pts" in line
    # rows acted on are training rows of the file, as many as the fraction says
    train_rows = set(p["split_rows"]["train"])
    for r in p["runs"]:
        assert set(r["rows_acted_on"]) <= train_rows and len(r["rows_acted_on"]) == round(0.05 * len(train_rows))
    assert p["args"]["eps"] == 0.3 and p["labels"]["classes"] == ["approve", "deny"]


def test_numeric_labels_are_reported_as_the_file_writes_them(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    x = rng.normal(size=n)
    grade = np.where(x > 0, "2.0", "1.0")  # integer-valued floats: classes 1.0 and 2.0, not codes 0 and 1
    path = tmp_path / "g.csv"
    path.write_text("x,grade\n" + "".join(f"{a:.3f},{g}\n" for a, g in zip(x, grade)))
    out = tmp_path / "n"
    _ok(["noisy-labels", "--csv", path, "--label", "grade", "--epochs", 2, "--out", out])
    p = json.loads((out / "noisy_labels.json").read_text())
    file_rows = _rows(path)
    assert [str(v) for v in p["table"]["given_label"]] == [file_rows[r]["grade"] for r in p["table"]["row"]]
    assert p["labels"]["classes"] == [1.0, 2.0]
