"""`python -m telepathy` = the `telepathy` command."""

import sys

from telepathy.cli import main

sys.exit(main())
