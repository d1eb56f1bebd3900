"""`python -m stardomain ...` runs the command-line tool."""

from .cli import main

main()
