"""``python -m minimask ...``: see :mod:`minimask.cli`."""
import sys

from minimask.cli import main

sys.exit(main())
