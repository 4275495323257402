"""certdist: certified training with distillation from empirically-robust teachers."""

__version__ = "0.1.0"

from certdist.threats import ThreatModel  # noqa: E402
from certdist.bounds import Interval, LinearBounds  # noqa: E402

__all__ = ["ThreatModel", "Interval", "LinearBounds", "__version__"]
