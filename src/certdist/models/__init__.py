"""Model registry: ``build_model(name, spec)``."""
from __future__ import annotations

from certdist.models.cnn import MODELS, CertifiableNet, InputSpec, as_certifiable, check_float32, flat_layers
from certdist.models.init import ibp_init
from certdist.models.layers import Normalize


def build_model(name: str, spec: InputSpec, init: str = "ibp") -> CertifiableNet:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    model = MODELS[name](spec)
    if init == "ibp":
        ibp_init(model)
    elif init != "default":
        raise ValueError(f"unknown init {init!r}; known: 'ibp', 'default'")
    return model


__all__ = ["MODELS", "CertifiableNet", "InputSpec", "Normalize", "as_certifiable", "build_model", "check_float32", "flat_layers",
           "ibp_init"]
