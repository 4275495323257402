"""Attacks: ``pgd(model, x, y, threat, steps, restarts, step_size)`` returns the worst point found;
``apgd`` / ``apgd_ensemble`` (APGD-CE + APGD-DLR, Croce & Hein 2020) likewise."""
from certdist.attacks.apgd import apgd, apgd_ensemble, dlr_loss
from certdist.attacks.pgd import margin_loss, pgd

__all__ = ["apgd", "apgd_ensemble", "dlr_loss", "margin_loss", "pgd"]
