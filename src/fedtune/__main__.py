"""``python -m fedtune``: the ``fedtune`` command."""

from fedtune.cli import main

main()
