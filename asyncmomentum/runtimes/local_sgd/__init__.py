"""Asynchronous local SGD (the DiLoCo family): H inner steps per worker, then a pseudo-gradient.

- :mod:`.pseudo_gradient`: the transport-free pieces every runtime shares (compute, check and
  apply a pseudo-gradient; validate ``sync_every``).
- :mod:`.simulate`: a seeded one-process simulator with workers of given speeds, synchronous
  DiLoCo, and the Delayed Nesterov outer optimizer of Liu et al. (2024).
- :mod:`.worker`: the real worker's rounds over any transport (the parameter server runs them
  for a ``ParameterServerJob(sync_every=H, inner_optimizer_fn=...)``).
"""

from asyncmomentum.runtimes.local_sgd.pseudo_gradient import (
    apply_pseudo_gradient,
    check_outer_optimizer,
    check_pseudo_gradient,
    check_sync_every,
    flat_parameters,
    pseudo_gradient,
)
from asyncmomentum.runtimes.local_sgd.simulate import (
    DelayedNesterov,
    LocalSGDHistory,
    LocalSGDProblem,
    applied_momentum,
    simulate_local_sgd,
)
from asyncmomentum.runtimes.local_sgd.worker import LocalSGDRounds, run_local_sgd_rounds

__all__ = [
    "DelayedNesterov",
    "LocalSGDHistory",
    "LocalSGDProblem",
    "LocalSGDRounds",
    "applied_momentum",
    "apply_pseudo_gradient",
    "check_outer_optimizer",
    "check_pseudo_gradient",
    "check_sync_every",
    "flat_parameters",
    "pseudo_gradient",
    "run_local_sgd_rounds",
    "simulate_local_sgd",
]
