"""β schedules: how β falls from 1 to 0 over the transition."""

from .schedule import SCHEDULES, BetaSchedule, default_transition, make_schedule

__all__ = ["BetaSchedule", "make_schedule", "default_transition", "SCHEDULES"]
