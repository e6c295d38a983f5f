"""One progress-bar convention for the whole library."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar: ``progress=True`` always shows it, ``False`` never,
    ``None`` only on a terminal."""
    return tqdm(total=total, desc=desc, disable={True: False, False: True, None: None}[progress], leave=False)
