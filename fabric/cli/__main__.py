"""``python -m fabric.cli``: the ``fabric`` command line."""

from fabric.cli import main

main()
