"""The settings of the certification pipeline: :class:`CertifyConfig` (everything that determines a
verdict), the verdict statuses and the registry of complete verifiers (:data:`COMPLETE_METHODS`), which
``certdist certify --complete`` and ``benchmarks/certify.py`` read. No torch import: the command line
builds its parser from here."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

STATUSES = ("misclassified", "falsified", "verified", "unknown")

# The complete verifiers a point left open by the bound stages can go to: name -> what it is (for help
# texts; "" for a name that says it all). The stage that runs them is ``complete_stage`` in
# :mod:`certdist.verification.stages`.
COMPLETE_VERIFIERS: dict[str, str] = {
    "auto": "default: the exact MILP when few ReLUs are unstable and the net has a dense form, else chain-bab",
    "chain-bab": "branch and bound on the layer chain",
    "bab": "branch and bound on the dense form",
    "milp": "",
    "none": "",
}
COMPLETE_METHODS = tuple(COMPLETE_VERIFIERS)


def complete_help() -> str:
    """The help text of a ``--complete`` option, from :data:`COMPLETE_VERIFIERS`."""
    return ("complete verifier for the points the bound stages leave open: "
            + ", ".join(name + (f" ({what})" if what else "") for name, what in COMPLETE_VERIFIERS.items()))


@dataclass(frozen=True)
class CertifyConfig:
    """Everything that determines a verdict (saved in every record's ``config`` hash-free form).

    The budget of a point is counted in work (the effort budget), so that one checkpoint gives the same
    verdicts on any machine and under any load: ``quick_attack_steps`` x ``quick_restarts`` PGD steps
    (margin loss, the restarts batched), then IBP and CROWN, then on the points still open ``attack_steps``
    x ``restarts`` PGD steps per loss in ``attack_losses`` and ``apgd_restarts`` x ``attack_steps`` APGD-DLR
    steps, ``alpha_iterations`` alpha-CROWN steps, and for the complete stage at most ``max_domains``
    branch-and-bound domains (all margin rows together) or ``milp_max_nodes`` MILP nodes per row.
    ``timeout`` is the wall-clock cap per point (all stages together; the full attack gets at most
    ``attack_share`` of it): a point that hits it ends ``unknown`` with ``capped`` in its record, and only
    such points' verdicts can depend on the machine's speed; :func:`summarize` counts them.

    ``complete``: ``auto`` (the exact MILP when the network has a dense form and the point has at most
    ``milp_max_unstable`` unstable ReLUs after CROWN, else ``chain-bab``), ``chain-bab`` (branch and bound on
    the layer chain, any network), ``bab`` (branch and bound on the dense form; ``chain-bab`` for networks
    without one), ``milp`` (dense form only) or ``none``. ``bab_*``: branch-and-bound batch size and
    alpha/beta optimisation steps per batch; ``chain_bab_alpha_steps``: those of the chain BaB, whose children
    start from their parent's slopes and multipliers, so that fewer steps suffice. ``max_dense_weights``:
    complete verification needs the network as dense matrices of at most this many entries each.
    ``counterexample_dir``: also save each counterexample as ``<index>.pt`` there.
    ``batched_ibp``: decide misclassified and IBP-verified points for the whole file in batches first
    (``batch_size`` points at a time) and run the per-point pipeline on the rest only; the verdicts are those
    of the per-point order, since a point that IBP proves robust can have no counterexample for the attack to
    find (only the times differ: such a point is charged its share of the batch's time)."""

    timeout: float = 10.0
    complete: str = "auto"
    quick_attack_steps: int = 20
    quick_restarts: int = 2
    attack_steps: int = 100
    restarts: int = 5
    attack_losses: tuple[str, ...] = ("margin", "ce")
    apgd_restarts: int = 5
    attack_share: float = 0.3
    alpha_iterations: int = 20
    alpha_lr: float = 0.1
    milp_max_unstable: int = 64
    milp_max_nodes: int = 5000
    milp_threads: int = 1
    max_domains: int = 2000
    bab_batch: int = 64
    bab_alpha_steps: int = 20
    chain_bab_alpha_steps: int = 10
    max_dense_weights: int = 20_000_000
    seed: int = 0
    counterexample_dir: str | None = None
    batched_ibp: bool = True
    batch_size: int = 256

    # fields that cannot change a verdict (only where files go and how the work is batched)
    NOT_VERDICT_RELEVANT = ("counterexample_dir", "batched_ibp", "batch_size", "milp_threads")

    def verdict_settings(self) -> dict[str, Any]:
        """The fields that can change a verdict, as saved in every record (resume refuses others)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.name not in self.NOT_VERDICT_RELEVANT}

    def __post_init__(self) -> None:
        if self.complete not in COMPLETE_METHODS:
            raise ValueError(f"unknown complete method {self.complete!r}; known: {', '.join(COMPLETE_METHODS)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.attack_steps < 0 or self.restarts < 1 or self.apgd_restarts < 0:
            raise ValueError(f"need attack_steps >= 0, restarts >= 1 and apgd_restarts >= 0, got {self.attack_steps}, "
                             f"{self.restarts}, {self.apgd_restarts}")
        if self.quick_attack_steps < 0 or self.quick_restarts < 1:
            raise ValueError(f"need quick_attack_steps >= 0 and quick_restarts >= 1, got {self.quick_attack_steps}, "
                             f"{self.quick_restarts}")
        if not 0 < self.attack_share <= 1:
            raise ValueError(f"attack_share is the wall-clock share of the full attack, in (0, 1]; got {self.attack_share}")
        if self.max_domains < 1 or self.milp_max_nodes < 1 or self.alpha_iterations < 0:
            raise ValueError(f"need max_domains >= 1, milp_max_nodes >= 1 and alpha_iterations >= 0, got "
                             f"{self.max_domains}, {self.milp_max_nodes}, {self.alpha_iterations}")
