from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str | None, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise a one-line ImportError naming what to install:
    the pip extra that provides it, or (``extra=None``) the package itself, a
    dependency of hessfree that is missing from this environment."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        how = f"pip install 'hessfree[{extra}]'" if extra else f"pip install {pkg} (a dependency of hessfree)"
        raise ImportError(f"this needs the '{pkg}' package, which is not installed; install it with {how}") from e
