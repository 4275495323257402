"""Bound propagation algorithms: IBP (ibp.py), CROWN / CROWN-IBP (crown/: rules, chain and backward passes,
intermediate bounds, patches, api), alpha-CROWN (alpha.py)."""
from certdist.propagation.alpha import alpha_crown
from certdist.propagation.crown import CROWN_RULES, crown, crown_ibp
from certdist.propagation.ibp import IBP_RULES, ibp, linear_spec_interval, propagate

__all__ = ["CROWN_RULES", "IBP_RULES", "alpha_crown", "crown", "crown_ibp", "ibp", "linear_spec_interval",
           "propagate"]
