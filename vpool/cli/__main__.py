"""`python -m vpool.cli ...`, as the tests and launchers start vpool."""

from vpool.cli import main

main()
