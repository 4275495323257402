"""Bound propagation algorithms (IBP here; CROWN / alpha-CROWN in crown.py / alpha.py)."""
from certdist.propagation.ibp import IBP_RULES, ibp, linear_spec_interval, propagate

__all__ = ["IBP_RULES", "ibp", "linear_spec_interval", "propagate"]
