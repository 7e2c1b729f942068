"""PyTorch Lightning callbacks for asyncmomentum.

- :class:`AsyncMomentumCallback`: keeps the total momentum of any optimizer at a target under
  asynchrony, and logs implicit/algorithmic/total momentum, staleness and the estimated workers.
- :class:`StaleGradients`: makes a run asynchronous on one machine (gradients at parameters of
  ``tau`` steps ago, ``tau`` from :mod:`asyncmomentum.runtimes.simulate`'s staleness models), for
  studies.
- :class:`AsyncParameterServerStrategy`: trains asynchronously for real: every process a worker
  of a parameter server in rank 0, in compute groups (synchronous inside, asynchronous across).
"""

from lightning_callbacks.async_strategy import AsyncParameterServerStrategy
from lightning_callbacks.momentum import AsyncMomentumCallback
from lightning_callbacks.stale_gradients import StaleGradients

__all__ = ["AsyncMomentumCallback", "AsyncParameterServerStrategy", "StaleGradients"]
