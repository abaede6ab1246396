"""``python -m peftadapt.bench memory|speed|peers|memory-table ...`` (same as ``peftadapt bench ...``)."""

import sys

from .cli import main

sys.exit(main())
