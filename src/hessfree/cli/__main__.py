"""``python -m hessfree.cli``: the ``hessfree`` command line."""

from . import main

if __name__ == "__main__":
    main()
