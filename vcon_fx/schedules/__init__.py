"""β schedules: how β falls from 1 to 0 over the transition, one registered kind per name.

A new kind is one file whose function is decorated with `register_curve` (one β for every
group) or `register_schedule` (β per group), imported in `schedule.py` (docs/extending.md).
"""

from .registry import register_curve, register_schedule, registered_schedules
from .schedule import SCHEDULES, BetaSchedule, default_transition, make_schedule

__all__ = ["BetaSchedule", "make_schedule", "default_transition", "SCHEDULES", "register_curve", "register_schedule",
           "registered_schedules"]
