"""`python -m ecsnap` is the `ecsnap` command."""

from ecsnap.entrypoints.cli.main import main

main()
