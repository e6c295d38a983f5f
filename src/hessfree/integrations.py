"""From a Hugging Face ``transformers.Trainer`` run to TracIn-CP members.

TracIn-CP scores a training example by

    score_i = sum_c eta_c * grad l(z_i; theta_c) . grad f(theta_c)

over saved checkpoints ``theta_c``, with ``eta_c`` the learning rate in effect
around checkpoint ``c``. A Trainer saves the weights (``checkpoint-N/``) but not
the rates. :class:`TrainerCallback` records the rate of every optimizer step and
writes, into each new checkpoint folder, ``hessfree_lr.json``: the mean rate over
the steps since the previous save, the step range and the per-step rates.
:meth:`hessfree.members.Checkpoints.from_trainer` reads them back::

    trainer = transformers.Trainer(model, args, train_dataset=data,
                                   callbacks=[hf.integrations.TrainerCallback()])
    trainer.train()
    members = hf.members.Checkpoints.from_trainer(args.output_dir)

``transformers`` is imported only when :class:`TrainerCallback` is first used.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ._io import atomic_write_json

LR_FILE = "hessfree_lr.json"
FORMAT = "hessfree.learning_rates"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# transformers logs the rate a step used from 4.51 on (before: the rate of the next step)
_LOGS_RATE_OF_STEP = (4, 51)

# TrainerCallback is built on first access (module __getattr__), importing transformers then
__all__ = ["FORMAT", "LR_FILE", "TrainerCallback", "TrainerCheckpoint", "trainer_checkpoints"]  # noqa: F822


@dataclass(frozen=True)
class TrainerCheckpoint:
    """One ``checkpoint-N`` folder of a Trainer run.

    Attributes:
        step: N, the optimizer steps taken when it was saved.
        path: the folder.
        lr: mean learning rate over the steps it stands for (``None`` when not asked for).
        source: where ``lr`` came from: ``"hessfree_lr.json"`` or ``"trainer_state.json"``.
    """

    step: int
    path: Path
    lr: float | None = None
    source: str | None = None


def trainer_checkpoints(output_dir: str | Path, need_rates: bool = True) -> list[TrainerCheckpoint]:
    """The ``checkpoint-N`` folders of a Trainer ``output_dir``, sorted by N, with their learning rates.

    The rate of checkpoint N is read from its ``hessfree_lr.json`` (written by
    :class:`TrainerCallback`: the mean over the steps since the previous save);
    without one, from its ``trainer_state.json``: the mean of the logged
    ``learning_rate`` over the steps since the previous ``checkpoint-N`` folder
    on disk, which must all be logged (``logging_steps=1``).

    Args:
        output_dir: the Trainer's ``output_dir``.
        need_rates: read the learning rates (``False``: folders and steps only).

    Raises:
        FileNotFoundError: ``output_dir`` is not a folder or has no ``checkpoint-N`` folder.
        ValueError: a rate cannot be established; the message names the
            checkpoint and the fix (the callback, ``logging_steps=1`` or ``lrs=``).
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Trainer output_dir {str(root)!r} is not a folder")
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))
    )
    if not found:
        raise FileNotFoundError(
            f"{str(root)!r} holds no checkpoint-N folder; train with save_strategy='steps' or 'epoch' "
            f"(found {sorted(p.name for p in root.iterdir())[:12]})"
        )
    out, previous = [], 0
    for step, path in found:
        if not need_rates:
            out.append(TrainerCheckpoint(step, path))
            continue
        recorded = _recorded_rate(path, step)
        if recorded is not None:
            out.append(TrainerCheckpoint(step, path, recorded, LR_FILE))
        else:
            out.append(TrainerCheckpoint(step, path, _logged_rate(path, previous, step), TRAINER_STATE))
        previous = step
    return out


def _recorded_rate(folder: Path, step: int) -> float | None:
    path = folder / LR_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); delete it to fall back on trainer_state.json") from e
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} was not written by hessfree.integrations.TrainerCallback")
    if rec.get("checkpoint_step") != step:
        raise ValueError(
            f"{str(path)!r} records step {rec.get('checkpoint_step')} but lies in the folder of step {step}; "
            "the folder was renamed or copied: pass lrs= to Checkpoints.from_trainer"
        )
    lr = rec.get("learning_rate")
    if lr is None:
        raise ValueError(
            f"checkpoint-{step}: no single learning rate was recorded ({rec.get('problem')}); "
            "pass lrs= to Checkpoints.from_trainer"
        )
    lr = float(lr)
    if not math.isfinite(lr):
        raise ValueError(f"{str(path)!r} records learning rate {lr}; pass lrs= to Checkpoints.from_trainer")
    return lr


def _writer_version(folder: Path) -> tuple[int, int] | None:
    """transformers version of the run: the checkpoint's config.json, else the installed one."""
    version = None
    config = folder / "config.json"
    if config.is_file():
        try:
            version = json.loads(config.read_text()).get("transformers_version")
        except ValueError:
            version = None
    if version is None:
        try:
            version = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            return None
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _logged_rate(folder: Path, previous: int, step: int) -> float:
    fix = (
        f"add hessfree.integrations.TrainerCallback() to the Trainer's callbacks (it writes {LR_FILE} into "
        "each checkpoint), train with logging_steps=1, or pass lrs= to Checkpoints.from_trainer"
    )
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise ValueError(f"checkpoint-{step} has neither {LR_FILE} nor {TRAINER_STATE}: its learning rate is unknown; {fix}")
    version = _writer_version(folder)
    if version is None or version < _LOGS_RATE_OF_STEP:
        written = "of unknown version" if version is None else "{}.{}".format(*version)
        raise ValueError(
            f"checkpoint-{step}: {TRAINER_STATE} comes from transformers {written}, which may log the learning "
            "rate of the step after the logged one (fixed in {}.{}); {}".format(*_LOGS_RATE_OF_STEP, fix)
        )
    try:
        history = json.loads(path.read_text()).get("log_history", [])
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); {fix}") from e
    logged: dict[int, float] = {}
    for entry in history:
        if isinstance(entry, dict) and "learning_rate" in entry and "step" in entry:
            logged.setdefault(int(entry["step"]), float(entry["learning_rate"]))
    wanted = range(previous + 1, step + 1)
    absent = [s for s in wanted if s not in logged]
    if absent:
        raise ValueError(
            f"checkpoint-{step}: {TRAINER_STATE} logs the learning rate at {len(wanted) - len(absent)} of the "
            f"{len(wanted)} steps {previous + 1}..{step} (missing e.g. step {absent[0]}); their mean is unknown; {fix}"
        )
    return sum(logged[s] for s in wanted) / len(wanted)


# ---- the callback (transformers imported on first use) ----------------------------------------------------------


def _group_rates(optimizer: Any) -> list[float] | None:
    if optimizer is None:
        return None
    return [float(g["lr"]) for g in optimizer.param_groups if len(g["params"])]


def _make_callback() -> type:
    import transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class TrainerCallback(transformers.TrainerCallback):
        """Records the learning rate of every optimizer step and writes, into each
        checkpoint folder the Trainer saves, the rates TracIn-CP weighs it by.

        The rate of a step is read from the optimizer's parameter groups when the
        step begins (``on_step_begin``), which is the rate ``optimizer.step()``
        then uses (the scheduler moves it after the step). On each save the
        callback writes ``checkpoint-N/hessfree_lr.json``::

            {"format": "hessfree.learning_rates", "version": 1, "checkpoint_step": N,
             "first_step": a, "last_step": N, "learning_rate": mean over steps a..N,
             "steps": [a, ..., N], "learning_rates": [rate of each step], "problem": null}

        Steps are optimizer steps (``state.global_step``), counted from the
        previous save (or the start of ``train()``, also when resuming).
        ``learning_rate`` is ``null``, with ``problem`` saying why, when a step
        in the range was not recorded or the parameter groups had different
        rates (TracIn-CP needs one rate per step); then
        :meth:`hessfree.members.Checkpoints.from_trainer` asks for ``lrs=``.

        Args:
            filename: name of the file written into each checkpoint folder.
        """

        def __init__(self, filename: str = LR_FILE):
            self.filename = filename
            self.rates: dict[int, list[float] | None] = {}
            self._pending: list[float] | None = None
            self._last_save = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.rates.clear()
            self._pending = None
            self._last_save = state.global_step

        def on_step_begin(self, args, state, control, **kwargs):
            self._pending = _group_rates(kwargs.get("optimizer"))

        def on_step_end(self, args, state, control, **kwargs):
            self.rates[state.global_step] = self._pending
            self._pending = None

        def record(self, first: int, last: int) -> dict[str, Any]:
            """What is written for the steps ``first..last`` (the JSON object above)."""
            steps = list(range(first, last + 1))
            problem = None
            absent = [s for s in steps if not self.rates.get(s)]
            split = [s for s in steps if s not in absent and len(set(self.rates[s])) != 1]
            if not steps:
                problem = "no optimizer step since the previous save"
            elif absent:
                problem = f"the rate of steps {absent[:5]} was not recorded (was the callback added mid-run?)"
            elif split:
                problem = f"the optimizer's parameter groups had different learning rates at step {split[0]}: {self.rates[split[0]]}"
            per_step = [None if s in absent or s in split else self.rates[s][0] for s in steps]
            rec: dict[str, Any] = {
                "format": FORMAT,
                "version": 1,
                "checkpoint_step": last,
                "first_step": first,
                "last_step": last,
                "learning_rate": None if problem else sum(per_step) / len(per_step),
                "steps": steps,
                "learning_rates": per_step,
                "problem": problem,
            }
            if split:
                rec["group_learning_rates"] = {str(s): self.rates[s] for s in split}
            return rec

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
                if folder.is_dir():
                    atomic_write_json(folder / self.filename, self.record(self._last_save + 1, step))
                else:
                    warnings.warn(
                        f"hessfree TrainerCallback: checkpoint folder {str(folder)!r} does not exist, so its learning "
                        "rates were not written; pass lrs= to Checkpoints.from_trainer for this run",
                        stacklevel=2,
                    )
            self.rates = {s: r for s, r in self.rates.items() if s > step}
            self._last_save = step

    TrainerCallback.__module__ = __name__
    TrainerCallback.__qualname__ = "TrainerCallback"
    return TrainerCallback


_lazy: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "TrainerCallback":
        if name not in _lazy:
            _lazy[name] = _make_callback()
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"TrainerCallback"})
