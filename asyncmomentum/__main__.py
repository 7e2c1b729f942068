"""``python -m asyncmomentum`` runs the command-line interface."""

from asyncmomentum.cli import main

raise SystemExit(main())
