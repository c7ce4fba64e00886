"""``python -m rbank_torch`` runs the ``rbank`` command line."""

from .cli import main

raise SystemExit(main())
