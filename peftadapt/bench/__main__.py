"""``python -m peftadapt.bench memory|speed|peers ...`` (same as ``peftadapt bench ...``)."""

import sys

from .cli import main

sys.exit(main())
