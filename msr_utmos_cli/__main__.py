"""`python -m msr_utmos_cli` runs the `utmos` command line."""
from .cli import main

main()
