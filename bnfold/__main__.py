"""``python -m bnfold``: the ``bnfold`` command, for environments whose scripts are not on PATH."""

from bnfold.console import main

main()
