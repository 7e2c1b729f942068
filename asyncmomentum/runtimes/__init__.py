"""Where asynchrony happens: the seeded simulator, Hogwild processes, the parameter server.

Each depends on the core only, and sees optimizers through :mod:`.adapter`, the one view of any
torch optimizer.
"""
