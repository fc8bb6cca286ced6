"""β schedules: how β falls from 1 to 0 over the transition, one registered kind per name."""

from .registry import register_curve, register_schedule, registered_schedules
from .schedule import SCHEDULES, BetaSchedule, default_transition, make_schedule

__all__ = ["BetaSchedule", "make_schedule", "default_transition", "SCHEDULES", "register_curve", "register_schedule",
           "registered_schedules"]
