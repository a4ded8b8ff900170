"""`python -m sender_service [options]` = `telepathy serve sender [options]`."""

import sys

from rpc.serve import main

sys.exit(main(["sender", *sys.argv[1:]]))
