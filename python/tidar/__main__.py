"""``python -m tidar ...`` (and ``torchrun -m tidar train ...``, ``accelerate launch -m tidar train ...``): the CLI."""

import sys

from tidar.cli import main

sys.exit(main())
