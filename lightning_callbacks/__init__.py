"""PyTorch Lightning callbacks for asyncmomentum.

- :class:`AsyncMomentumCallback`: keeps the total momentum of any optimizer at a target under
  asynchrony, and logs implicit/algorithmic/total momentum, staleness and the estimated workers.
- :class:`StaleGradients`: makes a run asynchronous on one machine (gradients at parameters of
  ``tau`` steps ago, ``tau`` from :mod:`asyncmomentum.runtimes.simulate`'s staleness models), for
  studies.
- :class:`AsyncParameterServerStrategy`: trains asynchronously for real: every process a worker
  of a parameter server in rank 0, in compute groups (synchronous inside, asynchronous across).
"""

import warnings

# pytorch_lightning's own pytree helper builds torch's deprecated LeafSpec, and torch 2.13 warns
# about it once per process: every process of a run printed it, and no user code can act on it.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)

from lightning_callbacks.async_strategy import AsyncParameterServerStrategy  # noqa: E402
from lightning_callbacks.momentum import AsyncMomentumCallback  # noqa: E402
from lightning_callbacks.stale_gradients import StaleGradients  # noqa: E402

__all__ = ["AsyncMomentumCallback", "AsyncParameterServerStrategy", "StaleGradients"]
