"""`python -m jpipe.train`: see `jpipe.train.cli`."""

import sys

from jpipe.train.cli import main

sys.exit(main())
