"""`python -m tessera.cli`: the same as the `tessera` console script."""

from tessera.cli.main import main

main()
