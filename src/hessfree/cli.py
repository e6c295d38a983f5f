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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
