"""``python -m localmoa`` is the ``localmoa`` command."""

from localmoa.cli import main

main()
