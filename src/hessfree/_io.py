"""Atomic file writes and saved-settings checks, one implementation for the library.

A file written here is complete or absent: the content goes to a temporary file
in the same folder (named for this process), is flushed to disk, and replaces
the target in one ``os.replace``. A reader never sees a partial file, and a
process killed mid-write leaves at most a ``.*.tmp`` file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``default=str`` for paths and the like)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed row)`` of each non-blank line of a JSON-lines file.

    Raises:
        FileNotFoundError: no such file (or a folder).
        ValueError: a line that is not valid JSON (file and line named), or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file; pass a JSON-lines file")
    seen = False
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            seen = True
            yield line_no, row
    if not seen:
        raise ValueError(f"{str(path)!r} has no rows")


def settings_differ(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between ``saved`` and ``now`` (a key missing on
    one side counts as different), sorted."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def check_settings(where: str | os.PathLike, saved: Mapping[str, Any], now: Mapping[str, Any],
                   error: type[Exception] = ValueError, fix: str = "use a new folder or delete the old one") -> None:  # fmt: skip
    """Raise ``error`` naming each differing key (saved vs now, first four) when the
    settings saved at ``where`` do not match the ones in use."""
    diff = settings_differ(saved, now)
    if diff:
        detail = "; ".join(f"{k}: saved {_short(saved.get(k))} vs now {_short(now.get(k))}" for k in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise error(f"{str(where)!r} was written with different settings ({detail}{more}); {fix}")


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
