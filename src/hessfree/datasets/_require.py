from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise ImportError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        raise ImportError(
            f"this data set needs the '{pkg}' package; install it with pip install 'hessfree[{extra}]' "
            f"(or pip install {pkg})"
        ) from e
