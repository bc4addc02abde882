"""Testing utilities for theta: a seeded, hostile UDP link (:class:`LinkConditioner`)."""

from ._conditioner import DirectionStats, GilbertElliott, LinkConditioner, LinkConditionerConfig

__all__ = ["DirectionStats", "GilbertElliott", "LinkConditioner", "LinkConditionerConfig"]
