"""`python -m tessera_dev up ...`: the same as `tessera dev up ...` (one error printer, --debug)."""

import sys

from tessera.cli.main import main

main(["dev", *sys.argv[1:]])
