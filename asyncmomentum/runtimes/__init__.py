"""Where asynchrony happens: the seeded simulator, Hogwild processes, the parameter server.
Each depends on the core only."""
