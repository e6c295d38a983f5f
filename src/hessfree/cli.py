"""The ``hessfree`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hessian-free influence functions for PyTorch models.")


@app.callback()
def _root() -> None:
    """Hessian-free influence functions: positive scores mean a training example helps the target."""


@app.command()
def demo(
    out: Path = typer.Option(Path("hessfree-out/demo"), help="Folder for the JSON result and the PNG grid."),
    seed: int = typer.Option(0, help="Seed of the split, the label flips, the model and the dropout members."),
    noise: float = typer.Option(0.10, help="Share of training labels flipped."),
    epochs: int = typer.Option(20, help="Training epochs (one checkpoint per epoch)."),
) -> None:
    """Find flipped labels in scikit-learn digits, then remove / relabel and retrain."""
    from .demo import run_demo

    run_demo(out=out, seed=seed, noise=noise, epochs=epochs)


# ---- applications -------------------------------------------------------------------
_DATA = typer.Option(None, "--data", help="Built-in data set: digits, mnist5k, adult, compas, german.")
_CSV = typer.Option(None, "--csv", help="Your CSV file instead of --data.")
_LABEL = typer.Option(None, "--label", help="CSV column with the labels.")
_GROUP = typer.Option(None, "--group", help="CSV column with the group (sensitive attribute).")
_FEATURES = typer.Option(None, "--features", help="Comma-separated CSV feature columns (default: all others).")
_NTRAIN = typer.Option(None, "--n-train", help="Subsample the training split of a built-in data set.")
_OUT_NOISY_LABELS = Path("hessfree-out/noisy-labels")
_OUT_DEFEND = Path("hessfree-out/defend")
_OUT_FAIRNESS = Path("hessfree-out/fairness")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command("noisy-labels")
def noisy_labels(
    data: str = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    features: str = _FEATURES,
    out: Path = typer.Option(_OUT_NOISY_LABELS, help="Folder for noisy_labels.json and PNG plots."),
    model: str = typer.Option("mlp", help="lr or mlp."),
    epochs: int = typer.Option(10, help="Training epochs (one checkpoint per epoch)."),
    noise: float = typer.Option(0.0, help="Flip this share of training labels first (to check detection)."),
    method: str = typer.Option("auto", help="auto (self, or class_utility when the noise looks systematic), self, self_weights, utility, class_utility or combined."),
    top: float | None = typer.Option(None, help="Share of the training data flagged as suspects (default: the estimated share of wrong labels, where the suggested label differs from the given one)."),
    suggest: str = typer.Option("members", help="Suggested label: members (averaged over the epoch checkpoints), prediction (final model) or influence."),
    seed: int = typer.Option(0, help="Seed of the split, the flips and the model."),
    n_train: int = _NTRAIN,
) -> None:
    """Rank training examples by how likely their label is wrong (self-influence TracIn-CP)."""
    from .apps.cli_commands import run_noisy_labels

    try:
        run_noisy_labels(data, csv, label, features, out, model, epochs, noise, method, top, seed, n_train, suggest)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


@app.command("defend")
def defend_command(
    data: str = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    features: str = _FEATURES,
    out: Path = typer.Option(_OUT_DEFEND, help="Folder for defend.json and a PNG bar chart."),
    model: str = typer.Option("lr", help="lr (LinearMinimal attack) or mlp (PGD attack)."),
    epochs: int = typer.Option(20, help="Training epochs."),
    action: str = typer.Option("remove", help="remove, relabel or reweight."),
    fraction: float = typer.Option(0.05, help="Share of the training data acted on."),
    draws: int = typer.Option(1, help="Number of attack draws (attacked held-out subsets)."),
    seed: int = typer.Option(0, help="Seed of the split and the model."),
    n_train: int = _NTRAIN,
) -> None:
    """Remove / relabel / reweight the training examples that weaken the model under attack, retrain, compare."""
    from .apps.cli_commands import run_defend

    try:
        run_defend(data, csv, label, features, out, model, epochs, action, fraction, draws, seed, n_train)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


@app.command("fairness")
def fairness_command(
    data: str = _DATA,
    csv: Path = _CSV,
    label: str = _LABEL,
    group: str = _GROUP,
    features: str = _FEATURES,
    out: Path = typer.Option(_OUT_FAIRNESS, help="Folder for fairness.json and the trade-off PNG."),
    model: str = typer.Option("lr", help="lr or mlp."),
    epochs: int = typer.Option(20, help="Training epochs."),
    metric: str = typer.Option("dp", help="dp (demographic parity) or eo (equal opportunity)."),
    action: str = typer.Option("remove", help="remove or reweight."),
    fractions: str = typer.Option("0.01,0.02,0.05,0.1", help="Comma-separated shares of the training data."),
    seed: int = typer.Option(0, help="Seed of the split and the model."),
    n_train: int = _NTRAIN,
) -> None:
    """Remove or reweight the examples that widen a group gap; trade-off curve against random removal."""
    from .apps.cli_commands import run_fairness

    try:
        run_fairness(data, csv, label, group, features, out, model, epochs, metric, action, fractions, seed, n_train)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


@app.command("select")
def select_command(
    pool: Path = typer.Option(..., "--pool", help="JSON lines with prompt and response fields (the candidates)."),
    target: Path = typer.Option(..., "--target", help="JSON lines with prompt, response and task fields (validation examples)."),
    model: Path = typer.Option(..., "--model", help="Folder of a local Hugging Face causal LM (and its tokenizer)."),
    out: Path = typer.Option(Path("selected.jsonl"), "--out", help="Selected pool rows, best first, with hessfree_index and hessfree_score."),
    fraction: float = typer.Option(0.05, help="Share of the pool to select."),
    gguf_file: str = typer.Option(None, "--gguf-file", help="GGUF file name inside --model, for GGUF checkpoints."),
    workdir: Path = typer.Option(None, "--workdir", help="Checkpoints and gradient store (default <out>.work); a rerun resumes."),
    warmup_fraction: float = typer.Option(0.05, help="Share of the pool the LoRA warm-up trains on."),
    warmup_epochs: int = typer.Option(4, help="Warm-up epochs = checkpoints."),
    lr: float = typer.Option(2e-4, help="Peak warm-up learning rate (AdamW, linear decay)."),
    dim: int = typer.Option(8192, "--dim", help="Projected gradient dimension."),
    similarity: str = typer.Option("cosine", help="cosine or dot."),
    combine: str = typer.Option("balanced", help="Several target tasks: balanced (equal share per task) or max (rank by the best task, as LESS)."),
    optimizer_aware: bool = typer.Option(False, "--optimizer-aware", help="Score Adam update directions of pool examples (LESS)."),
    batch_size: int = typer.Option(8, help="Examples per batch."),
    max_length: int = typer.Option(256, help="Tokens per example (responses truncated)."),
    seed: int = typer.Option(0, help="Seed of the warm-up subset, the adapter and the projection."),
) -> None:
    """Select the pool examples whose LoRA gradients best match the target tasks (TracIn-CP)."""
    from .selection import SelectionConfig, select_files

    try:
        cfg = SelectionConfig(
            fraction=fraction, warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs, lr=lr,
            projection_dim=dim, similarity=similarity, combine=combine, optimizer_aware=optimizer_aware, batch_size=batch_size, max_length=max_length, seed=seed,
        )  # fmt: skip
        cfg.validate()
        result = select_files(pool, target, model, out, cfg, workdir, gguf_file, progress=True)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)
    n = len(result.scores)
    typer.echo(f"selected {len(result.indices)} of {n} pool examples ({fraction:.1%}) -> {out}")
    for name, s in result.task_scores.items():
        chosen = s[result.indices]
        typer.echo(f"  task {name}: mean score selected {chosen.mean():.4g} vs pool {s.mean():.4g}")
    t = result.timings
    typer.echo(f"  time: warm-up {t['warmup_s']:.1f}s, features {t['featurize_s']:.1f}s, scores {t['score_s']:.1f}s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
