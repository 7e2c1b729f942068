"""asyncmomentum: momentum that retunes itself to the asynchrony of training.

Asynchronous SGD with ``M`` workers carries an implicit momentum ``1 - 1/M``
(Mitliagkas et al., 2016). :class:`AsyncMomentumSGD` measures the staleness of the gradients it
applies, estimates ``M`` and applies ``target - implicit`` so the total stays what you tuned.
"""

from asyncmomentum.core.formulas import implicit_momentum, workers_from_staleness
from asyncmomentum.core.measuring.staleness import StalenessEstimator, VersionClock
from asyncmomentum.core.optimizer import AsyncMomentumSGD, NonFiniteGradientError
from asyncmomentum.core.tracker import AsynchronyTracker, MomentumSummary
from asyncmomentum.core.tuning.rules import algorithmic_momentum, total_momentum

__version__ = "0.1.0"

__all__ = [
    "AsyncMomentumSGD",
    "AsynchronyTracker",
    "MomentumSummary",
    "NonFiniteGradientError",
    "StalenessEstimator",
    "VersionClock",
    "__version__",
    "algorithmic_momentum",
    "implicit_momentum",
    "total_momentum",
    "workers_from_staleness",
]
