"""`python -m sender_service [options]` = `telepathy serve sender [options]`."""

import sys

from telepathy.ops.serve import main

sys.exit(main(["sender", *sys.argv[1:]]))
