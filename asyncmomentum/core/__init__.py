"""The library: the optimizer, the tuning rules and what they measure.

Depends on torch and numpy only (and torchmetrics for
:mod:`~asyncmomentum.core.measuring.metrics`); never on the runtimes, the applications or
Lightning.
"""
