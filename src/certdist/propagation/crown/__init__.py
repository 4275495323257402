"""Backward linear bound propagation: CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

A specification ``C z`` of the network's output ``z`` is bounded by two linear functions of the input,
``lA x + lb <= C z <= uA x + ub``, built by walking ``model.layers()`` backwards with one rule per layer
type (:data:`CROWN_RULES`), then concretised over the threat model's box (``threat.box(x)``) or the ``box`` given.

ReLU relaxation, for pre-activation bounds ``l < 0 < u`` ("unstable"): upper bound the chord
``u (z - l) / (u - l)``; lower bound ``alpha z`` with ``alpha`` in [0, 1], by default the adaptive slope
(1 if ``u > -l`` else 0), or given per neuron and specification row (alpha-CROWN, see ``alpha.py``).
Stable neurons (``l >= 0`` or ``u <= 0``) are exact.

Pre-activation ("intermediate") bounds, one :class:`Interval` per ReLU, **in the order the ReLUs appear
in ``model.layers()``** (forward order), each of shape ``[B, *activation shape]``, come from:

- ``"ibp"``: interval bound propagation (CROWN-IBP);
- ``"crown"``: CROWN run backwards from every pre-activation layer, neuron by neuron (full CROWN, the
  semantics of auto_LiRPA's ``method="CROWN"``);
- ``"best"``: CROWN for the neurons IBP cannot prove stable, intersected with IBP; IBP is restarted from
  the intersected bounds at every ReLU. Never looser than either, and cheaper than ``"crown"``.

``intermediate_bounds`` (for branch and bound) overrides any entry that is not ``None``: a split
neuron is passed as ``l = 0`` (active) or ``u = 0`` (inactive); the returned bounds then hold over the
part of the box where the split constraints hold. Missing entries are computed from the given ones.

BatchNorm in training mode uses the statistics of the clean batch ``ref`` (default: ``x``), exactly as
:func:`certdist.propagation.ibp.ibp` does. Memory: the backward matrices are processed in chunks of
specification rows and samples so that they stay under ``max_memory`` bytes (an estimate: autograd
graphs kept for training come on top). On CUDA, cuDNN convolutions use TF32 unless
``torch.backends.cudnn.allow_tf32 = False``: turn it off when the bounds are used to certify.

The package: ``rules.py`` (one backward rule per layer type, the ReLU relaxation), ``chain.py`` (the chain and
the backward passes), ``intermediate.py`` (pre-activation bounds), ``patches.py`` (windows for convolutional
feature maps), ``api.py`` (the entry points, re-exported here).
"""
from certdist.propagation.crown.api import crown, crown_ibp, default_spec, prepare_chain
from certdist.propagation.crown.chain import (CPU_TENSOR_BYTES, DEFAULT_MAX_MEMORY, INTERMEDIATE_MODES, Chain, backward,
                                              bound_spec, build_chain, layers_of)
from certdist.propagation.crown.intermediate import intermediate_bounds_of, tighten_intermediate
from certdist.propagation.crown.rules import CROWN_RULES, LayerContext, backward_rule_for, register, relu_relaxation

__all__ = ["CPU_TENSOR_BYTES", "CROWN_RULES", "Chain", "DEFAULT_MAX_MEMORY", "INTERMEDIATE_MODES", "LayerContext",
           "backward", "backward_rule_for", "bound_spec", "build_chain", "crown", "crown_ibp", "default_spec",
           "intermediate_bounds_of", "layers_of", "prepare_chain", "register", "relu_relaxation",
           "tighten_intermediate"]
