"""The ``asyncmomentum`` command and what it runs: demo, sweep, bench, the bundled problems."""
