"""The guided DDIM step: CFG combine + feedback combine + DDIM update.

``reference`` holds the plain-torch formula, the single source of truth that every faster backend is tested
against.
"""

from .reference import cfg_combine, ddim_step, guided_ddim_step, normalise_feedback, split_prediction

__all__ = ["cfg_combine", "ddim_step", "guided_ddim_step", "normalise_feedback", "split_prediction"]
