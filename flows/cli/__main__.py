"""`python -m flows.cli`: the same as the `headstart` command."""

from flows.cli import main

main()
