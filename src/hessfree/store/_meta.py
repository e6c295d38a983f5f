"""Reading and checking a store's ``meta.json`` before the store is opened."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ._files import _check_path, os_error
from .errors import REBUILD, StoreCorruptError, StoreFormatError, StoreMismatchError

FORMAT = 2
"""The store format this version writes and reads."""


def read_meta(path: Path) -> dict | None:
    """The parsed ``meta.json`` of the store at ``path``, or ``None`` when there is none."""
    f = path / "meta.json"
    try:
        text = f.read_text()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        _check_path(path)
        raise
    except OSError as e:
        raise os_error(e, path, "reading meta.json") from e
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("no config")
    except ValueError as e:
        raise StoreCorruptError(f"{str(f)!r} is not readable ({e}); the store is damaged: {REBUILD}") from None
    return meta


def check_format(path: Path, meta: dict) -> None:
    """Refuse a store written in another format (:class:`StoreFormatError`)."""
    fmt = meta.get("format", meta.get("config", {}).get("format"))
    if fmt != FORMAT:
        raise StoreFormatError(
            f"the store at {str(path)!r} was written by an earlier version of hessfree (store format {fmt}), "
            "which recorded neither a hash of all the training data nor the loss, so it cannot be checked "
            f"against your model and data; rebuild it: {REBUILD}"
        )


def check_fresh(path: Path) -> None:
    """A folder without ``meta.json`` is taken as a new store only when it holds
    nothing but what a run killed before its first ``meta.json`` leaves."""

    def leftover(p: Path) -> bool:
        name = p.name
        if name.startswith(".") and name.endswith(".tmp") or name == ".lock":
            return True
        if p.is_file() and (re.fullmatch(r"m\d+\.(features|sqnorm)", name) or name == "example.pt"):
            return True  # arrays reserved by a run killed before its meta.json (earlier versions wrote them first)
        if p.is_dir() and name == "progress":
            return all(q.name.startswith(".") and q.name.endswith(".tmp") for q in p.iterdir())
        return False

    try:
        others = sorted(p.name for p in path.iterdir() if not leftover(p))
    except OSError as e:
        raise os_error(e, path, "listing the folder") from e
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise StoreMismatchError(
            f"{str(path)!r} exists and is not a hessfree store (no meta.json; it holds {shown}); "
            "pass an empty or new folder"
        )
