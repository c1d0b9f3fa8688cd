"""``python -m dmlkd`` runs the command line interface."""

from dmlkd.cli import main

main()
