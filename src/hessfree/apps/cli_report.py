"""What the ``noisy-labels``, ``defend`` and ``fairness`` commands print (rich tables) and
plot (PNG, with matplotlib from the ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table as RichTable

from . import commands as C


def console() -> Console:
    # no markup: labels, column names and pip extras ("hessfree[plots]") are printed as they are
    return Console(highlight=False, soft_wrap=True, markup=False)


def plots_or_note(png: str) -> Any:
    """pyplot, or ``None`` after saying which extra writes ``png``."""
    try:
        return C.pyplot()
    except ImportError as e:
        console().print(f"{png} not written: {e}")
        return None


def noisy_histogram(plt, out: Path, score: np.ndarray, flipped, cutoff, n_flag: int, method: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if flipped is not None:
        ax.hist([score[~flipped], score[flipped]], bins=50, stacked=True, label=["kept", "flipped by --noise"])
    else:
        ax.hist(score, bins=50, label="rows")
    if cutoff is not None:
        ax.axvline(cutoff, color="crimson", linestyle="--", label=f"cut-off: {n_flag} flagged (score >= {cutoff:.3g})")
    ax.legend(fontsize=7)
    ax.set_xlabel(f"suspicion ({method}; higher = more likely mislabelled)")
    ax.set_ylabel("rows")
    path = C.save_figure(fig, out, "noisy_labels.png")
    plt.close(fig)
    return path


def print_noisy(p: dict, records: list[dict], show: int, path: Path, png: Path | None) -> None:
    con = console()
    n, total = p["n_rows_scored"], p["n_rows_in_source"]
    which = f"all {n} rows" if n == total else f"{n} of the {total} rows (a seeded subsample, --n-train {n})"
    con.print(f"{which} of {p['data']} scored: {p['scheme']}; method {p['method']}")
    if show:
        t = RichTable(title=f"Most suspicious rows of {p['data']} ({p['row_short']})", title_justify="left")
        for col in ("rank", "row", "given label", "suggested label", "score", "uncertainty"):
            t.add_column(col, justify="right" if col in ("rank", "row", "score", "uncertainty") else "left", no_wrap=True)
        for i, r in enumerate(records[:show]):
            mark = "  (= given)" if r["suggested_equals_given"] else ""
            cut = i == p["n_flagged"] - 1 and p["n_flagged"] < len(records)
            t.add_row(str(i + 1), str(r["row"]), str(r["given_label"]), f"{r['suggested_label']}{mark}",
                      f"{r['score']:.4g}", f"{r['uncertainty']:.3f}", end_section=cut)  # fmt: skip
        con.print(t)
        if p["n_flagged"] < min(show, len(records)):
            con.print(f"(rows below the line are not flagged: the cut-off is rank {p['n_flagged']})")
    con.print(
        f"estimated share of wrong labels: {p['estimated_noise_share']:.1%} (rows whose suggested label differs from "
        f"the given one); flagged: {p['n_flagged']} rows ({p['flag_rule']})"
        + (f", cut-off score {p['cutoff_score']:.4g}" if p["cutoff_score"] is not None else "")
    )
    same = sum(r["suggested_equals_given"] for r in p["flagged"])
    if same:
        con.print(
            f"{same} flagged rows have a suggested label equal to the given one ('= given'): the models agree "
            "with the label but the row still scores high (a hard, atypical or ambiguous example); check it, "
            "but there is no better label to offer"
        )
    for note in p["notes"]:
        con.print(f"note: {note}")
    if "detection" in p:
        d = p["detection"]
        con.print(
            f"planted flips ({len(d['flipped_rows'])} rows): ROC-AUC {d['roc_auc']:.3f}, AP {d['average_precision']:.3f}, "
            f"{d['recall_top10']:.0%} of them in the top 10%; the suggested label restores "
            f"{d['suggestion_restores_label_on_flips']:.0%} of them"
        )
    con.print(f"wrote {path}" + (f" and {png}" if png else ""))


def defend_plot(plt, out, name, a, summary) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    labels = ["no defence", "random", "hessfree"]
    att = [summary["influence"]["attacked_acc_before"], summary["random"]["attacked_acc_after"], summary["influence"]["attacked_acc_after"]]
    cln = [summary["influence"]["clean_acc_before"], summary["random"]["clean_acc_after"], summary["influence"]["clean_acc_after"]]
    pos = np.arange(3)
    ax.bar(pos - 0.2, [100 * v for v in cln], 0.4, label="clean")
    ax.bar(pos + 0.2, [100 * v for v in att], 0.4, label="under attack")
    ax.set_xticks(pos, labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 115)
    ax.set_title(f"{name}, {a['model']}, {a['action']} {a['fraction']:.0%}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    path = C.save_figure(fig, out, "defend.png")
    plt.close(fig)
    return path


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def pts(v: float) -> str:
    return f"{100 * v:+.1f} pts"


def print_defend(p: dict, a: dict, path: Path, png: Path | None) -> None:
    con = console()
    n_test = p["sizes"]["test"]
    con.print(f"attack: {p['attack']}; measured on the {n_test} test rows attacked against the original model")
    s = p["mean_over_draws"]
    draws = "1 attack draw" if a["draws"] == 1 else f"mean of {a['draws']} attack draws"
    t = RichTable(title=f"Test accuracy, {a['action']} {a['fraction']:.0%} of the {p['sizes']['train']} training rows "
                        f"({draws})", title_justify="left")  # fmt: skip
    t.add_column("training data", no_wrap=True)
    for col in ("clean", "change", "under attack", "change"):
        t.add_column(col, justify="right", no_wrap=True)
    before = s["influence"]
    t.add_row("all (no defence)", pct(before["clean_acc_before"]), "", pct(before["attacked_acc_before"]), "")
    for strategy, words in (("random", f"{a['action']} at random"), ("influence", f"{a['action']} by hessfree")):
        r = s[strategy]
        t.add_row(words, pct(r["clean_acc_after"]), pts(r["clean_acc_after"] - r["clean_acc_before"]),
                  pct(r["attacked_acc_after"]), pts(r["attacked_acc_after"] - r["attacked_acc_before"]))  # fmt: skip
    con.print(t)
    con.print(f"wrote {path}" + (f" and {png}" if png else ""))


def fairness_plot(plt, out, results, metric) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for strategy, r in results.items():
        ax.plot([100 * p.accuracy for p in r.curve], [p.gap for p in r.curve], "o-",
                label="hessfree" if strategy == "influence" else "random removal")  # fmt: skip
    inf = results["influence"]
    ax.plot([100 * inf.acc_before], [inf.gap_before], "k*", markersize=12, label="before")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel(f"{metric.upper()} gap")
    ax.legend(fontsize=7)
    path = C.save_figure(fig, out, "fairness.png")
    plt.close(fig)
    return path


def print_fairness(p: dict, fractions: list[float], path: Path, png: Path | None) -> None:
    con = console()
    lab, grp = p["labels"], p["groups"]
    con.print(
        f"favourable label: {str(lab['favourable'])!r} ({lab['favourable_from']}); groups of {grp['column']!r}: "
        + ", ".join(repr(str(c)) for c in grp["classes"])
    )
    gap = p["metric"].upper()
    done = {"remove": "removed", "reweight": "reweighted"}[p["action"]]
    t = RichTable(title=f"{gap} gap and test accuracy, a share of the {p['sizes']['train']} training rows {done}",
                  title_justify="left")  # fmt: skip
    for col in ("share", f"{gap} gap, hessfree", "accuracy", f"{gap} gap, random", "accuracy"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_row("0 (before)", f"{p['gap_before']:.3f}", pct(p["acc_before"]), f"{p['gap_before']:.3f}", pct(p["acc_before"]))
    for q_inf, q_rnd in zip(p["influence"]["curve"], p["random"]["curve"]):
        t.add_row(f"{q_inf['fraction']:.0%}", f"{q_inf['gap']:.3f}", pct(q_inf["accuracy"]), f"{q_rnd['gap']:.3f}",
                  pct(q_rnd["accuracy"]))  # fmt: skip
    con.print(t)
    b = p["best_within_1_point"]
    if b is None:
        con.print(f"no share narrows the {gap} gap ({p['gap_before']:.3f}) while keeping test accuracy within 1 point of "
                  f"{pct(p['acc_before'])}")  # fmt: skip
    else:
        r = b["random_at_same_fraction"]
        con.print(
            f"best within 1 point of accuracy: {gap} gap {p['gap_before']:.3f} -> {b['gap']:.3f} at {b['fraction']:.0%} "
            f"(accuracy {pct(b['accuracy'])}); random removal at {b['fraction']:.0%}: gap {r['gap']:.3f}, accuracy {pct(r['accuracy'])}"
        )
    con.print(f"wrote {path}" + (f" and {png}" if png else ""))
