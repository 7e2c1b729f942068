"""The one protocol of a tuning rule: what it observes, the momentum it returns, its state.

A rule turns the target total momentum and the implicit momentum of the observed asynchrony
(``1 - 1/M_hat``, which the :class:`~asyncmomentum.core.tracker.AsynchronyTracker` estimates)
into the algorithmic momentum to apply. A rule that needs more says so with its capability
flags, and the tracker hands it what it asks for: every staleness (:meth:`TuningRule.observe`),
the momentum meter's readings (:meth:`TuningRule.observe_reading`, ``uses_meter``), a curvature
(:meth:`TuningRule.observe_curvature`, ``uses_curvature``), the group's learning rate
(``needs_lr``). A new rule is a subclass in a file of its own plus one line in the registry
(:data:`asyncmomentum.core.tuning.rules.RULES`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from asyncmomentum.core import formulas

if TYPE_CHECKING:
    from asyncmomentum.core.measuring.meter import MomentumReading

__all__ = ["TuningRule"]


class TuningRule(ABC):
    """Target and implicit momentum (and what the flags ask for) in, algorithmic momentum out.

    Subclasses set :attr:`name` and the flags, and implement :meth:`algorithmic_momentum`;
    everything else has a default: no observation is needed, the totals are composed
    additively, there is no state. A rule object belongs to one tracker (it may keep per-run
    state); build one per tuner.

    Attributes:
        name: the rule's name in the registry, in logs and as the key of its state in the
            tuner's state dict.
        uses_meter: the rule feeds on the momentum meter's readings (:meth:`observe_reading`):
            whoever owns the tuner must run a
            :class:`~asyncmomentum.core.measuring.meter.MomentumMeter` and hand them over.
        uses_curvature: the rule needs the largest curvature of the loss
            (:meth:`observe_curvature`), e.g. from a
            :class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator`.
        needs_lr: :meth:`algorithmic_momentum` needs the parameter group's learning rate.
        stateful: the rule keeps state between calls (observations, readings, a curvature):
            its momentum is not a formula of ``(target, implicit)`` alone.
        revision: bumped whenever the rule's behaviour changes, so that caches of its runs
            (the sweep's) recompute them and keep every other rule's.
    """

    name: ClassVar[str] = ""
    uses_meter: ClassVar[bool] = False
    uses_curvature: ClassVar[bool] = False
    needs_lr: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    revision: ClassVar[int] = 1

    # -- inputs -------------------------------------------------------------------------------

    def observe(self, tau: int) -> None:  # noqa: B027
        """Record the staleness of one applied gradient; by default the rule does not need it.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0),
                already checked by the tuner's estimator.
        """

    def observe_reading(self, reading: MomentumReading | None) -> None:  # noqa: B027
        """Take the momentum meter's latest reading; by default the rule ignores it.

        Args:
            reading: :attr:`MomentumMeter.reading
                <asyncmomentum.core.measuring.meter.MomentumMeter.reading>` (``None``: none yet).
        """

    def observe_curvature(self, lambda_max: float) -> None:
        """Set the largest curvature of the loss; only for rules with :attr:`uses_curvature`.

        Args:
            lambda_max: largest Hessian eigenvalue (not times ``lr``, >= 0).
        """
        raise ValueError(
            f"observe_curvature is for a rule that uses a curvature (rule='stability'); "
            f"rule {self.name!r} does not"
        )

    @property
    def curvature(self) -> float | None:
        """The ``lambda_max`` the rule works with, ``None`` if it uses none or has none yet."""
        return None

    # -- output ---------------------------------------------------------------------------------

    @abstractmethod
    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """The momentum to apply so that the total is ``target``, inside ``bounds``.

        Args:
            target: the total momentum to reach, in (-1, 1) (checked by the caller).
            implicit: the implicit momentum of the observed asynchrony, in [0, 1).
            lr: the parameter group's learning rate (required by rules with :attr:`needs_lr`).
            bounds: ``(low, high)`` clip range of the result, as
                :func:`~asyncmomentum.core.validation.check_momentum_bounds` returns it.
        """

    def total_momentum(self, algorithmic: float, implicit: float) -> float:
        """Total momentum that ``algorithmic`` and ``implicit`` compose to under this rule.

        By default the additive composition ``algorithmic + implicit`` (the feedback rules
        report their totals in it).

        Args:
            algorithmic: the momentum an optimizer applies.
            implicit: the implicit momentum of the asynchrony.
        """
        return formulas.additive_total(algorithmic, implicit)

    # -- lifecycle ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the rule has observed (its configuration stays the constructor's).

        ``{}`` when it keeps nothing (the tuner then writes no entry for it).
        """
        return {}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"{type(self).__name__} state must be a dict, got {type(state_dict).__name__}"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)

    def reset(self) -> None:  # noqa: B027
        """Forget what was observed: the rule starts from scratch (its configuration stays)."""

    def share_memory(self) -> TuningRule:
        """Put the rule's state in shared memory for Hogwild processes; returns self.

        The default shares nothing: right for a rule without state. A stateful rule that
        leaves this alone keeps one state per process.
        """
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
