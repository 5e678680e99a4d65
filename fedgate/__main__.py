"""``python -m fedgate`` is the ``fedgate`` command."""

import sys

from fedgate.cli import main

sys.exit(main())
