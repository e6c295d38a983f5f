"""The ``hessfree`` command line.

Every flag is checked when the command line is read, before any data is loaded
or model trained: a value of the wrong type or outside its range stops the
command with one line on stderr that names the flag, the value and the allowed
range, and exit code 2. Flag combinations and the data are checked next, still
before any training (same format, exit code 2). A missing optional package
gives one line naming the extra to install (exit code 1). Ctrl-C stops a
command with one line saying whether a rerun resumes (exit code 130).
"""


from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from ._options import (
    EPOCHS,
    RESUMABLE,
    SEED,
    BuiltinData,
    Number,
    _Group,
    _run,
    choice_parser,
    fractions_parser,
)

app = typer.Typer(
    cls=_Group, add_completion=False, no_args_is_help=True, help="Hessian-free influence functions for PyTorch models."
)


@app.callback()
def _root() -> None:
    """Hessian-free influence functions: positive scores mean a training example helps the target."""


# ---- demo -------------------------------------------------------------------------------------------

DEMO_ROWS, DEMO_VAL, DEMO_MIN_TEST = 1797, 300, 100


@app.command()
def demo(
    out: Path = typer.Option(Path("hessfree-out/demo"), help="Folder for demo.json and the PNG grid (the PNG needs the plots extra)."),
    seed: int = typer.Option(0, parser=SEED, help="Seed of the split, the label flips, the model and the dropout members."),
    noise: float = typer.Option(0.10, parser=Number(float, 0, 0.9, lo_open=True, hi_open=True, example="--noise 0.1",
                                meaning="share of training labels flipped; at 0.9 a label is as likely wrong as right"),
                                help="Share of training labels flipped, 0 < x < 0.9."),  # fmt: skip
    epochs: int = typer.Option(20, parser=EPOCHS, help="Training epochs (one checkpoint per epoch)."),
    n_train: int = typer.Option(1000, "--n-train", parser=Number(int, 100, DEMO_ROWS - DEMO_VAL - DEMO_MIN_TEST,
                                example="--n-train 1000", meaning=f"digits has {DEMO_ROWS} rows; {DEMO_VAL} are kept for validation, at least {DEMO_MIN_TEST} for the test"),
                                help="Training rows drawn from digits (the rest: 300 validation, the others test)."),  # fmt: skip
    retrain_seeds: int = typer.Option(5, "--retrain-seeds", parser=Number(int, 1, 50, example="--retrain-seeds 5"),
                                      help="Training seeds averaged in each retraining row."),  # fmt: skip
) -> None:
    """Find flipped labels in scikit-learn digits, then remove / relabel and retrain."""

    def body():
        if int(round(noise * n_train)) < 1:
            raise ValueError(f"--noise {noise:g} flips no label of the {n_train} training rows; use --noise >= {0.5 / n_train:.2g}")
        typer.echo("hessfree demo: loading PyTorch and the digits data ...", err=True)
        from ..apps.commands import prepare_out
        from ..demo import run_demo
        run_demo(out=prepare_out(out), seed=seed, noise=noise, epochs=epochs, n_train=n_train, retrain_seeds=retrain_seeds,
                 progress=True, args={"out": str(out), "seed": seed, "noise": noise, "epochs": epochs, "n_train": n_train,
                                      "retrain_seeds": retrain_seeds})  # fmt: skip

    _run(body)


# ---- applications -------------------------------------------------------------------------------------
_DATA = typer.Option(None, "--data", help="Built-in data set: digits, mnist5k, adult, compas, german.")  # fmt: skip
_CSV = typer.Option(None, "--csv", help="Your CSV file instead of --data (a header line, then one row per example).")
_LABEL = typer.Option(None, "--label", help="CSV column with the class labels (text or integers).")
_GROUP = typer.Option(None, "--group", help="CSV column with the group (sensitive attribute).")
_FEATURES = typer.Option(None, "--features", help="Comma-separated CSV feature columns (default: all others).")
_MODEL = typer.Option("mlp", help="lr (logistic / softmax regression) or mlp (one hidden layer of 64).")
_SEED = typer.Option(0, parser=SEED, help="Seed of the split, the flips and the model.")
_SEED_NO_FLIPS = typer.Option(0, parser=SEED, help="Seed of the split and the model.")
_OUT_NOISY_LABELS = Path("hessfree-out/noisy-labels")
_OUT_DEFEND = Path("hessfree-out/defend")
_OUT_FAIRNESS = Path("hessfree-out/fairness")


def _n_train_option(help: str):
    return typer.Option(None, "--n-train", parser=Number(int, 10, example="--n-train 500"), help=help)


@app.command("noisy-labels")
def noisy_labels(
    data: BuiltinData | None = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    features: str = _FEATURES,
    out: Path = typer.Option(_OUT_NOISY_LABELS, help="Folder for noisy_labels.json and noisy_labels.png."),
    model: Literal["lr", "mlp"] = _MODEL,
    epochs: int = typer.Option(10, parser=EPOCHS, help="Training epochs (one checkpoint per epoch)."),
    folds: int = typer.Option(1, parser=Number(int, 1, 100, example="--folds 5", meaning="1: one model on every row"),
                              help="1 (default): one model trained on every row scores every row; K >= 2: K-fold "
                                   "cross-fitting, each row scored by a model trained on the other folds (K times the "
                                   "training; see docs/applications.md for the comparison)."),  # fmt: skip
    noise: float = typer.Option(0.0, parser=Number(float, 0, 1, hi_open=True, example="--noise 0.1",
                                meaning="share of rows whose label is flipped first, to check detection; 0: none"),
                                help="Flip this share of the labels first, to check detection (0: none)."),  # fmt: skip
    method: Literal["auto", "self", "self_weights"] = typer.Option("auto", help="auto (= self here: the labels of the file are not trusted, so the methods that "
                                    "need trusted validation data are left to the Python API), self or self_weights."),  # fmt: skip
    top: float = typer.Option(None, parser=Number(float, 0, 1, lo_open=True, example="--top 0.1",
                              meaning="share of the rows flagged"),
                              help="Share of the rows flagged as suspects (default: the estimated share of wrong labels, "
                                   "where the suggested label differs from the given one)."),  # fmt: skip
    suggest: Literal["members", "prediction", "influence"] = typer.Option("members", help="Suggested label: members (averaged over the epoch checkpoints), prediction (final "
                                     "model) or influence."),  # fmt: skip
    show: int = typer.Option(20, parser=Number(int, 0, 10_000, example="--show 20"), help="Rows printed in the table of suspects."),
    seed: int = _SEED,
    n_train: int = _n_train_option("Score a seeded subsample of this many rows of a built-in data set (default: all)."),
) -> None:
    """Rank every row by how likely its label is wrong (self-influence TracIn-CP); table, JSON and PNG."""
    args = dict(data=data, csv=csv, label=label, features=features, out=out, model=model, epochs=epochs, folds=folds,
                noise=noise, method=method, top=top, suggest=suggest, show=show, seed=seed, n_train=n_train)  # fmt: skip

    def body():
        from ..apps.cli_commands import run_noisy_labels

        run_noisy_labels(args)

    _run(body)


@app.command("defend")
def defend_command(
    data: BuiltinData | None = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    features: str = _FEATURES,
    out: Path = typer.Option(_OUT_DEFEND, help="Folder for defend.json and defend.png."),
    model: Literal["lr", "mlp"] = typer.Option("lr", help="lr (LinearMinimal attack) or mlp (PGD attack)."),
    epochs: int = typer.Option(20, parser=EPOCHS, help="Training epochs."),
    action: Literal["remove", "relabel", "reweight"] = typer.Option("remove", help="remove, relabel or reweight."),
    fraction: float = typer.Option(0.05, parser=Number(float, 0, 1, lo_open=True, hi_open=True, example="--fraction 0.05",
                                   meaning="share of the training rows acted on"), help="Share of the training rows acted on."),  # fmt: skip
    draws: int = typer.Option(1, parser=Number(int, 1, 100, example="--draws 5"), help="Attack draws (attacked held-out subsets); results are averaged."),
    eps: float = typer.Option(None, parser=Number(float, 0, lo_open=True, example="--eps 0.25",
                              meaning="L-inf radius in standardised feature units"),
                              help="Strength of the PGD attack of --model mlp: L-inf radius in standardised feature units (default 0.25)."),  # fmt: skip
    overshoot: float = typer.Option(None, parser=Number(float, 0, lo_open=True, example="--overshoot 0.3",
                                    meaning="share by which a point is pushed past the decision boundary"),
                                    help="Strength of the LinearMinimal attack of --model lr: how far past the decision "
                                         "boundary each point is pushed, as a share of its distance (default 0.3)."),  # fmt: skip
    seed: int = _SEED_NO_FLIPS,
    n_train: int = _n_train_option("Subsample the training split of a built-in data set to this many rows."),
) -> None:
    """Remove / relabel / reweight the training rows that weaken the model under attack, retrain, compare."""
    args = dict(data=data, csv=csv, label=label, features=features, out=out, model=model, epochs=epochs, action=action,
                fraction=fraction, draws=draws, eps=eps, overshoot=overshoot, seed=seed, n_train=n_train)  # fmt: skip

    def body():
        from ..apps.cli_commands import run_defend

        run_defend(args)

    _run(body)


@app.command("fairness")
def fairness_command(
    data: BuiltinData | None = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    group: str = _GROUP,
    features: str = _FEATURES,
    favourable: str = typer.Option(None, "--favourable", help="The favourable class of --label, as written in the CSV "
                                   "(needed unless the classes are 0 / 1, where 1 is the default)."),  # fmt: skip
    out: Path = typer.Option(_OUT_FAIRNESS, help="Folder for fairness.json and fairness.png."),
    model: Literal["lr", "mlp"] = typer.Option("lr", help="lr or mlp."),
    epochs: int = typer.Option(20, parser=EPOCHS, help="Training epochs."),
    metric: Literal["dp", "eo"] = typer.Option("dp", help="dp (demographic parity) or eo (equal opportunity)."),
    action: Literal["remove", "reweight"] = typer.Option("remove", help="remove or reweight."),
    fractions: str = typer.Option("0.01,0.02,0.05,0.1", parser=fractions_parser, help="Comma-separated shares of the training rows, each 0 < x < 1."),
    seed: int = _SEED_NO_FLIPS,
    n_train: int = _n_train_option("Subsample the training split of a built-in data set to this many rows."),
) -> None:
    """Remove or reweight the rows that widen a group gap; trade-off curve against random removal."""
    args = dict(data=data, csv=csv, label=label, group=group, features=features, favourable=favourable, out=out,
                model=model, epochs=epochs, metric=metric, action=action, fractions=fractions, seed=seed, n_train=n_train)  # fmt: skip

    def body():
        from ..apps.cli_commands import run_fairness

        run_fairness(args)

    _run(body)


@app.command("select")
def select_command(
    pool: Path = typer.Option(..., "--pool", exists=True, dir_okay=False, help="JSON lines with prompt and response fields (the candidates)."),
    target: Path = typer.Option(..., "--target", exists=True, dir_okay=False, help="JSON lines with prompt, response and task fields (validation examples)."),
    model: Path = typer.Option(..., "--model", help="Folder of a local Hugging Face causal LM (and its tokenizer)."),
    out: Path = typer.Option(Path("selected.jsonl"), "--out", help="Selected pool rows in selection order (best first with --combine max), with hessfree_index and hessfree_score; "
                             "the arguments and scores summary go to <out stem>.summary.json."),  # fmt: skip
    fraction: float = typer.Option(0.05, parser=Number(float, 0, 1, lo_open=True, example="--fraction 0.05",
                                   meaning="share of the pool selected"), help="Share of the pool to select."),  # fmt: skip
    gguf_file: str = typer.Option(None, "--gguf-file", help="GGUF file name inside --model, for GGUF checkpoints."),
    workdir: Path = typer.Option(None, "--workdir", help="Checkpoints and gradient store (default <out>.work); a rerun resumes."),
    warmup_fraction: float = typer.Option(0.05, parser=Number(float, 0, 1, lo_open=True, example="--warmup-fraction 0.05",
                                          meaning="share of the pool the warm-up trains on"),
                                          help="Share of the pool the LoRA warm-up trains on."),  # fmt: skip
    warmup_epochs: int = typer.Option(4, parser=Number(int, 1, 1000, example="--warmup-epochs 4"), help="Warm-up epochs = checkpoints."),
    lr: float = typer.Option(2e-4, parser=Number(float, 0, 1, lo_open=True, example="--lr 2e-4"), help="Peak warm-up learning rate (AdamW, linear decay)."),
    dim: int = typer.Option(8192, "--dim", parser=Number(int, 1, example="--dim 8192"), help="Projected gradient dimension."),
    similarity: Literal["cosine", "dot"] = typer.Option("cosine", help="cosine or dot."),
    combine: Literal["balanced", "max"] = typer.Option("balanced", help="Several target tasks: balanced (equal share per task) or max (rank by the best task, as LESS)."),  # fmt: skip
    optimizer_aware: bool = typer.Option(False, "--optimizer-aware", help="Score Adam update directions of pool examples (LESS)."),
    batch_size: int = typer.Option(8, parser=Number(int, 1, example="--batch-size 8"), help="Examples per batch."),
    max_length: int = typer.Option(256, parser=Number(int, 1, example="--max-length 256"), help="Tokens per example (responses truncated)."),
    seed: int = typer.Option(0, parser=SEED, help="Seed of the warm-up subset, the adapter and the projection."),
    lora_targets: str = typer.Option("q_proj,v_proj", "--lora-targets", help="Comma-separated names of the layers that get a LoRA adapter (GPT-2: c_attn)."),
    lora_r: int = typer.Option(8, "--lora-r", parser=Number(int, 1, example="--lora-r 8"), help="LoRA rank."),
    lora_alpha: int = typer.Option(16, "--lora-alpha", parser=Number(int, 1, example="--lora-alpha 16"), help="LoRA alpha (scale alpha / r)."),
) -> None:
    """Select the pool examples whose LoRA gradients best match the target tasks (TracIn-CP)."""
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    args = dict(pool=str(pool), target=str(target), model=str(model), out=str(out), fraction=fraction, gguf_file=gguf_file,
                workdir=None if workdir is None else str(workdir), warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs,
                lr=lr, dim=dim, similarity=similarity, combine=combine, optimizer_aware=optimizer_aware,
                batch_size=batch_size, max_length=max_length, seed=seed, lora_targets=list(targets), lora_r=lora_r,
                lora_alpha=lora_alpha)  # fmt: skip

    def body():
        from .._io import atomic_write_json
        from ..selection import SelectionConfig, select_files

        if not targets:
            raise ValueError(f"--lora-targets {lora_targets!r} names no layer; e.g. --lora-targets q_proj,v_proj")

        if out.exists() and out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a folder; pass the path of the JSON-lines file to write")
        cfg = SelectionConfig(
            fraction=fraction, warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs, lr=lr,
            projection_dim=dim, similarity=similarity, combine=combine, optimizer_aware=optimizer_aware, batch_size=batch_size, max_length=max_length, seed=seed,
            lora_targets=list(targets), lora_r=lora_r, lora_alpha=lora_alpha,
        )  # fmt: skip
        cfg.validate()
        result = select_files(pool, target, model, out, cfg, workdir, gguf_file, progress=True)
        n = len(result.scores)
        typer.echo(f"selected {len(result.indices)} of {n} pool examples ({fraction:.1%}) -> {out}")
        tasks = {}
        for name, s in result.task_scores.items():
            chosen = s[result.indices]
            tasks[name] = {"mean_score_selected": float(chosen.mean()), "mean_score_pool": float(s.mean())}
            typer.echo(f"  task {name}: mean score selected {chosen.mean():.4g} vs pool {s.mean():.4g}")
        t = result.timings
        typer.echo(f"  time: warm-up {t['warmup_s']:.1f}s, features {t['featurize_s']:.1f}s, scores {t['score_s']:.1f}s")
        summary = out.with_name(out.stem + ".summary.json")
        atomic_write_json(summary, {
            "command": "select", "args": args, "n_pool": n, "n_selected": len(result.indices),
            "score_meaning": "TracIn-CP: summed learning rate x similarity; positive = helps the task",
            "tasks": tasks, "timings_s": dict(t),
        })  # fmt: skip
        typer.echo(f"  summary: {summary}")

    _run(body, RESUMABLE)


@app.command("attribute")
def attribute_command(
    model: Path = typer.Option(..., "--model", help="Model folder (a transformers causal LM with its tokenizer), or a peft adapter folder whose base model is a local folder."),
    train: Path = typer.Option(..., "--train", help="Training JSONL: prompt/response, text, or Alpaca instruction/input/output rows."),
    query: list[Path] = typer.Option(..., "--query", help="Query JSONL in the same formats (repeat --query for several files)."),
    out: Path = typer.Option(Path("hessfree-out/attribute"), "--out", help="Folder for the store, settings.json and the <query>.attribution.jsonl / .md reports."),
    adapter: Path = typer.Option(None, "--adapter", help="peft adapter folder to load on --model (gradients over the adapter only)."),
    checkpoints: Path = typer.Option(None, "--checkpoints", help="Trainer output_dir with checkpoint-N folders (TracIn-CP); default: the model as it is."),
    lr: float = typer.Option(None, "--lr", parser=Number(float, 0, lo_open=True, example="--lr 2e-4"),
                             help="Learning rate of every checkpoint, when the folders have no recorded rates."),  # fmt: skip
    k: int = typer.Option(10, "--k", parser=Number(int, 1, 10_000, example="--k 10"), help="Training examples reported per query."),
    dim: int = typer.Option(None, "--dim", parser=Number(int, 1, example="--dim 4096"), help="Projected gradient dimension (default 4096)."),
    exact: bool = typer.Option(False, "--exact", help="Exact gradients instead of a projection (small models only)."),
    per_token: bool = typer.Option(False, "--per-token", help="Also the influence of each top example on each response token of the query."),
    max_length: int = typer.Option(256, parser=Number(int, 1, example="--max-length 256"), help="Tokens per example (responses truncated)."),
    batch_size: int = typer.Option(8, parser=Number(int, 1, example="--batch-size 8"), help="Examples per batch."),
    seed: int = typer.Option(None, parser=SEED, help="Seed of the projection (default 0)."),
    hessian: str = typer.Option("fisher", "--hessian", parser=choice_parser("--hessian", ("fisher", "identity")),
                                help="fisher (default): curvature-corrected terms (damped empirical Fisher of the stored gradients); identity: plain TracIn-CP products."),  # fmt: skip
    damping_ratio: float = typer.Option(None, "--damping-ratio", parser=Number(float, 0, lo_open=True, example="--damping-ratio 1"),
                                        help="With --hessian fisher: damping = this x the mean eigenvalue of each checkpoint's Fisher (default 1, see docs/fidelity.md part d)."),  # fmt: skip
    trust: bool = typer.Option(False, "--trust", help="Also compare the scores with curvature-corrected ones (empirical Fisher) on each query file and say whether the identity is adequate (<query>.trust/trust.json)."),
) -> None:
    """The training examples that helped each query most (TracIn-CP over the checkpoints), as JSONL and markdown."""

    def body():
        from ..apps.attribution import attribute

        if damping_ratio is not None and hessian != "fisher":
            raise ValueError(f"--damping-ratio {damping_ratio:g} applies to --hessian fisher only (got --hessian {hessian})")
        if exact and (dim is not None or seed is not None):
            given = " ".join(f for f, v in (("--dim", dim), ("--seed", seed)) if v is not None)
            raise ValueError(f"{given} sets the projection, and --exact uses exact gradients (no projection); drop one")
        for name, path in (("--model", model), ("--train", train), *(("--query", q) for q in query)):
            if not path.exists():
                raise ValueError(f"{name} {str(path)!r} does not exist")
        reports = attribute(
            model, train, query, out, adapter=adapter, checkpoints=checkpoints, lrs=lr, k=k,
            projection_dim=None if exact else (4096 if dim is None else dim), per_token=per_token, max_length=max_length,
            batch_size=batch_size, seed=0 if seed is None else seed, hessian=hessian, damping_ratio=damping_ratio, trust=trust, progress=True,
        )  # fmt: skip
        for r in reports:
            shown = max((len(rec["top"]) for rec in r.records), default=0)
            typer.echo(f"{r.query_file}: top {shown} training examples for {len(r.records)} queries -> {r.jsonl}, {r.markdown}")
            if r.trust is not None:
                typer.echo(f"trust, {r.query_file.name}:\n{r.trust}")
                if r.trust.ground_truth is None:
                    typer.echo("(the command line retrains nothing; for the retraining spot check call "
                               "hf.diagnostics.trust(..., train_fn=) from Python)")

    _run(body, RESUMABLE)


def _ranges_in_help() -> None:
    """Append each number flag's allowed range to its help text (one source: the parser)."""
    import inspect

    for command in app.registered_commands:
        for param in inspect.signature(command.callback).parameters.values():
            info = param.default
            if isinstance(getattr(info, "parser", None), Number) and "Allowed:" not in (info.help or ""):
                info.help = f"{info.help or ''} Allowed: {info.parser.allowed()}.".strip()


_ranges_in_help()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
