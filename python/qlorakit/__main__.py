"""``python -m qlorakit``."""

import sys

from qlorakit.cli import main

sys.exit(main())
