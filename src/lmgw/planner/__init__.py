"""Recommended worker counts per role, learned from the gateway's own observations."""

from .core import Planner, RolePlan, Signal, level_of, quantile

__all__ = ["Planner", "RolePlan", "Signal", "level_of", "quantile"]
