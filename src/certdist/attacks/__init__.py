"""Attacks: ``pgd(model, x, y, threat, steps, restarts, step_size)`` returns the worst point found."""
from certdist.attacks.pgd import margin_loss, pgd

__all__ = ["margin_loss", "pgd"]
