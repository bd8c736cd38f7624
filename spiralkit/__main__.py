"""``python -m spiralkit`` runs the ``spiral`` command."""

from spiralkit.cli import main

main()
