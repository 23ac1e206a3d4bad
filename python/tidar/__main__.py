"""``python -m tidar ...`` (and ``torchrun -m tidar train ...``, ``accelerate launch -m tidar train ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
