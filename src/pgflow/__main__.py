"""``python -m pgflow`` is the ``pgflow`` command."""

from .cli import main

main()
