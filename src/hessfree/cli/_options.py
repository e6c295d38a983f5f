"""Flag types, one-line errors and the interrupt guard of the ``hessfree`` command line."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 ships its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _click_errors

BuiltinData = Literal["digits", "mnist5k", "adult", "compas", "german"]
EXIT_USAGE, EXIT_MISSING_EXTRA, EXIT_INTERRUPTED = 2, 1, 130
NOT_RESUMABLE = "interrupted before the results were written; rerun the same command to start over (it does not resume)"
RESUMABLE = "interrupted; rerun the same command to resume"


def _one_line(text: str) -> str:
    text = " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return text.replace(": Value error, ", ": ")  # how typer words a refused choice


def _error(msg: str) -> None:
    typer.secho(f"error: {_one_line(msg)}", fg=typer.colors.RED, err=True)


class _Group(TyperGroup):
    """Reports a bad command line in one line (``error: ...``) instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            _error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            _error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


# ---- flag types: parse and range-check in one step ------------------------------------------------


class Number:
    """Parser of a number in a range; its error names the value, the range and an example."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, example: str = "", meaning: str = ""):  # fmt: skip
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.example, self.meaning = example, meaning

    def _num(self, v: float) -> str:
        return str(int(v)) if self.kind is int else f"{v:g}"

    def allowed(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            lo, hi = "<" if self.lo_open else "<=", "<" if self.hi_open else "<="
            return f"{kind} with {self._num(self.lo)} {lo} x {hi} {self._num(self.hi)}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self._num(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self._num(self.hi)}"
        return kind

    def _fail(self, what: str):
        extra = f" ({self.meaning})" if self.meaning else ""
        example = f", e.g. {self.example}" if self.example else ""
        raise typer.BadParameter(f"{what}; allowed: {self.allowed()}{extra}{example}")

    def __call__(self, value: Any):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = self.kind(str(value).strip())
            except ValueError:
                self._fail(f"{str(value)!r} is not {'an integer' if self.kind is int else 'a number'}")
        v = self.kind(value)
        if self.kind is float and not math.isfinite(v):
            self._fail(f"{value} is not a finite number")
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low or high:
            self._fail(f"{self._num(v)} is out of range")
        return v


def fractions_parser(value: Any) -> list[float] | None:
    """Comma-separated shares, each in (0, 1), none repeated."""
    if value is None or isinstance(value, list):
        return value
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    try:
        out = [float(s) for s in items]
    except ValueError:
        raise typer.BadParameter(f"{str(value)!r} is not a comma-separated list of numbers; allowed: shares with "
                                 "0 < x < 1, e.g. --fractions 0.01,0.05,0.1") from None  # fmt: skip
    bad = [s for s, f in zip(items, out) if not (math.isfinite(f) and 0 < f < 1)]
    if not out or bad:
        raise typer.BadParameter(f"{str(value)!r} has {', '.join(bad) if bad else 'no value'} out of range; allowed: "
                                 "each share with 0 < x < 1, e.g. --fractions 0.01,0.05,0.1")  # fmt: skip
    if len(set(out)) != len(out):
        raise typer.BadParameter(f"{str(value)!r} repeats a share; give each share once")
    return out


def choice_parser(flag: str, allowed: tuple[str, ...]) -> Callable[[Any], str]:
    """A parser that accepts one of ``allowed`` (exactly) and names the flag and the choices otherwise."""

    def parse(value: Any) -> str:
        if value is None or value in allowed:
            return value
        raise typer.BadParameter(f"{flag} {value!r} is not one of {', '.join(allowed)}")

    return parse


SEED = Number(int, 0, 2**32 - 1, example="--seed 0")
EPOCHS = Number(int, 1, 10_000, example="--epochs 10", meaning="training epochs")
SHARE_OPEN = Number(float, 0, 1, lo_open=True, hi_open=True, example="0.05")


@contextmanager
def _guard(interrupted: str = NOT_RESUMABLE) -> Iterator[None]:
    """One-line errors for bad data, missing extras and Ctrl-C."""
    from ..errors import HessfreeError

    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"\n{interrupted}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ImportError as e:
        _error(str(e))
        raise typer.Exit(EXIT_MISSING_EXTRA) from None
    except (HessfreeError, ValueError, FileNotFoundError) as e:
        _error(str(e))
        raise typer.Exit(EXIT_USAGE) from None


def _run(body: Callable[[], Any], interrupted: str = NOT_RESUMABLE) -> Any:
    with _guard(interrupted):
        return body()
