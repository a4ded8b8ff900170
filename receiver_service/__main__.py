"""`python -m receiver_service [options]` = `telepathy serve receiver [options]`."""

import sys

from telepathy.ops.serve import main

sys.exit(main(["receiver", *sys.argv[1:]]))
