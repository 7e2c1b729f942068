"""``python -m asyncmomentum`` runs the command-line interface."""

from asyncmomentum.applications.cli import main

raise SystemExit(main())
