"""``python -m hessfree``: the ``hessfree`` command line (as ``python -m hessfree.cli``)."""

from .cli import main

if __name__ == "__main__":
    main()
