"""``python -m recopt ...``: the same command line as the ``recopt`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
