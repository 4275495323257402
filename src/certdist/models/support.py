"""The layer-support contract: the one list of layer configurations that EVERY algorithm handles.

A network enters certdist (``certify``, the bound functions, ``evaluate``, ``fit``, ``export_onnx``)
through :func:`check_supported`, which walks it once, before any work, and raises
:class:`UnsupportedNetworkError` (a ValueError) naming the module path, its type, the unsupported
option and what is supported. A network that passes is handled the same way by every algorithm:

    algorithm         where                                 reads the layers through
    ibp               propagation/ibp.py                    IBP_RULES (exact type)
    crown             propagation/crown/rules.py            CROWN_RULES, the patches path (``_PATCH_LAYERS``)
    alpha-crown       propagation/alpha.py                  crown's rules and chain
    rounding          verification/rounding.py              ROUNDING_RULES (class hierarchy; float32 error bound)
    dense             verification/dense.py                 DENSE_ROLES (relu / affine: torch forward of the folded
                                                            affine blocks)
    milp / bab        verification/milp.py, bab.py          the dense form
    chain-bab         verification/chain_bab.py             crown's rules and chain
    onnx              interop/onnx_export.py                ONNX_RULES (exact type) + the numpy evaluator
    describe          models/describe.py                    LAYERS (checkpoint architecture descriptions)
    init, L1          models/init.py, training/regularizers  WEIGHTED_LAYERS (the entries marked ``weighted``)

Adding a layer type: an entry here, then one rule in each of those tables (the coverage test in
``tests/soundness/test_layer_support.py`` names every table that lacks one), and configurations of it in
that test's CONFIGS.

The contract (:data:`SUPPORTED_LAYERS`; shapes per sample, without the batch dimension):

    layer (exact type)  supported configuration                                    every algorithm
    Linear              input [..., in_features] of any rank >= 1 (acts on the     yes (head: flat input)
                        last dimension); bias optional
    Conv2d              input [C, H, W]; int / tuple padding, padding_mode         yes
                        'zeros'; any stride, dilation, kernel shape (non-square);
                        groups=1; bias optional
    ReLU                any (inplace=True only where it cannot overwrite the       yes
                        network's input)
    BatchNorm1d         input [C] or [C, L]; eval mode: running statistics         yes (verification,
                        (track_running_stats=True); affine optional                export: eval mode)
    BatchNorm2d         input [C, H, W]; as BatchNorm1d                            yes
    AvgPool2d           input [C, H, W]; any kernel / stride / padding with        yes
                        ceil_mode=False, divisor_override=None, and
                        count_include_pad=True or padding=0
    Flatten             start_dim=1, end_dim=-1                                    yes
    Normalize           input [C, H, W] with C = len(mean)                         yes

Refused up front: any other layer type, subclasses of these types (they may override ``forward``),
Identity / Dropout (no IBP / CROWN rule), Conv2d ``padding='same'/'valid'`` (write the numbers),
``padding_mode`` other than zeros, ``groups > 1`` (no numpy ONNX evaluator), AvgPool2d ``ceil_mode`` /
``divisor_override`` / ``count_include_pad=False`` with padding (no CROWN rule), ``Flatten`` other than
``(1, -1)``; and everything that makes ``model(x)`` (which attacks and counterexample checks run)
differ from the function the bound rules read off the parameters: forward / forward-pre / backward
hooks on any module or global module hooks, ``torch.nn.utils.parametrize`` (new-style weight_norm /
spectral_norm), pruning (``*_orig`` parameters, ``*_mask`` buffers, the pruning pre-hook), old-style
hook-based weight_norm / spectral_norm, a ``forward`` overridden on an instance, parameters replaced by
plain tensors; and containers other than :class:`~certdist.models.CertifiableNet` / ``nn.Sequential``
(nested ``nn.Sequential`` allowed, not inside ``CertifiableNet.features``), whose order is not the
forward order. The last layer must be an ``nn.Linear`` on a flat input (the classification head).

``tests/soundness/test_layer_support.py`` checks every algorithm against every entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from certdist.models.cnn import CertifiableNet, as_certifiable
from certdist.models.layers import Normalize

ALGORITHMS = ("ibp", "crown", "crown-ibp", "alpha-crown", "rounding", "dense", "milp", "bab", "chain-bab", "onnx")


class UnsupportedNetworkError(ValueError, TypeError):
    """A network (a layer, an option, a hook, a container) outside the layer-support contract. A
    ValueError; also a TypeError, the type that the per-algorithm rules raised before this check."""


Shape = tuple[int, ...]


class _Refuse(Exception):
    """Internal: the reason one layer is refused (wrapped with its path by :func:`check_supported`)."""


@dataclass(frozen=True)
class LayerSupport:
    """One entry of the contract: the exact layer type, what of it is supported (for messages and
    docs), ``options(m)`` raising :class:`_Refuse` on an unsupported option, and ``shape(m, in_shape)``:
    the per-sample output shape, raising :class:`_Refuse` on an unsupported input shape."""

    kind: type
    supported: str
    options: Callable[[nn.Module], None]
    shape: Callable[[nn.Module, Shape], Shape]
    params: tuple[str, ...] = ()  # tensors the rules read as attributes: must be real parameters/buffers
    weighted: bool = False  # a weight matrix / kernel: the IBP initialisation and the L1 penalty act on it


def _hw(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _rank(m: nn.Module, s: Shape, ranks: Sequence[int], what: str) -> None:
    if len(s) not in ranks:
        raise _Refuse(f"input of per-sample shape {tuple(s)} is not supported (needs {what})")


def _channels(m: nn.Module, s: Shape, c: int, name: str) -> None:
    if s[0] != c:
        raise _Refuse(f"input with {s[0]} channels, the layer has {name}={c}")


def _window(size: int, k: int, st: int, p: int, d: int, m: nn.Module) -> int:
    out = (size + 2 * p - d * (k - 1) - 1) // st + 1
    if out < 1:
        raise _Refuse(f"input of spatial size {size} is too small (output size {out})")
    return out


# --- Linear ---------------------------------------------------------------------------------------

def _linear_options(m: nn.Linear) -> None:
    pass


def _linear_shape(m: nn.Linear, s: Shape) -> Shape:
    if len(s) < 1 or s[-1] != m.in_features:
        raise _Refuse(f"input of per-sample shape {tuple(s)}: the last dimension must be in_features={m.in_features}")
    return (*s[:-1], m.out_features)


# --- Conv2d ---------------------------------------------------------------------------------------

def _conv_options(m: nn.Conv2d) -> None:
    if isinstance(m.padding, str):
        k, d = _hw(m.kernel_size), _hw(m.dilation)
        hint = ""
        if m.padding == "valid":
            hint = "; write padding=0"
        elif all(d[i] * (k[i] - 1) % 2 == 0 for i in range(2)):
            hint = f"; write the equivalent padding={tuple(d[i] * (k[i] - 1) // 2 for i in range(2))}"
        raise _Refuse(f"padding={m.padding!r} is not supported (only numeric padding: an int or a pair){hint}")
    if m.padding_mode != "zeros":
        raise _Refuse(f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    if m.groups != 1:
        raise _Refuse(f"groups={m.groups} is not supported (only groups=1)")
    if len(_hw(m.padding)) != 2:
        raise _Refuse(f"padding={m.padding!r} is not supported (an int or a pair)")


def _conv_shape(m: nn.Conv2d, s: Shape) -> Shape:
    _rank(m, s, (3,), "[C, H, W]")
    _channels(m, s, m.in_channels, "in_channels")
    k, st, p, d = _hw(m.kernel_size), _hw(m.stride), _hw(m.padding), _hw(m.dilation)
    return (m.out_channels, *(_window(s[1 + i], k[i], st[i], p[i], d[i], m) for i in range(2)))


# --- ReLU, Flatten --------------------------------------------------------------------------------

def _no_options(m: nn.Module) -> None:
    pass


def _same_shape(m: nn.Module, s: Shape) -> Shape:
    return tuple(s)


def _flatten_options(m: nn.Flatten) -> None:
    if m.start_dim != 1 or m.end_dim != -1:
        raise _Refuse(f"start_dim={m.start_dim}, end_dim={m.end_dim} is not supported (only Flatten(start_dim=1, "
                      "end_dim=-1): every algorithm keeps the batch dimension and flattens all others)")


def _flatten_shape(m: nn.Flatten, s: Shape) -> Shape:
    return (int(torch.Size(s).numel()),)


# --- BatchNorm ------------------------------------------------------------------------------------

def _bn_options(m: nn.modules.batchnorm._BatchNorm) -> None:
    if not m.training and not m.track_running_stats:
        raise _Refuse(f"track_running_stats=False: in eval mode it still normalises with the statistics of whatever "
                      "batch it gets, so the network is not a fixed function of its input and cannot be bounded, "
                      "verified or exported; train it with track_running_stats=True")


def _bn1d_shape(m: nn.BatchNorm1d, s: Shape) -> Shape:
    _rank(m, s, (1, 2), "[C] or [C, L]")
    _channels(m, s, m.num_features, "num_features")
    return tuple(s)


def _bn2d_shape(m: nn.BatchNorm2d, s: Shape) -> Shape:
    _rank(m, s, (3,), "[C, H, W]")
    _channels(m, s, m.num_features, "num_features")
    return tuple(s)


# --- AvgPool2d ------------------------------------------------------------------------------------

def _avgpool_options(m: nn.AvgPool2d) -> None:
    bad = []
    if m.ceil_mode:
        bad.append("ceil_mode=True")
    if m.divisor_override is not None:
        bad.append(f"divisor_override={m.divisor_override}")
    if not m.count_include_pad and any(_hw(m.padding)):
        bad.append(f"count_include_pad=False with padding={m.padding}")
    if bad:
        raise _Refuse(f"{', '.join(bad)} is not supported (supported: ceil_mode=False, divisor_override=None, and "
                      "count_include_pad=True or padding=0)")


def _avgpool_shape(m: nn.AvgPool2d, s: Shape) -> Shape:
    _rank(m, s, (3,), "[C, H, W]")
    k, p = _hw(m.kernel_size), _hw(m.padding)
    st = _hw(m.stride if m.stride is not None else m.kernel_size)
    return (s[0], *(_window(s[1 + i], k[i], st[i], p[i], 1, m) for i in range(2)))


# --- Normalize ------------------------------------------------------------------------------------

def _normalize_shape(m: Normalize, s: Shape) -> Shape:
    _rank(m, s, (3,), "[C, H, W]")
    _channels(m, s, m.mean.numel(), "len(mean)")
    return tuple(s)


SUPPORTED_LAYERS: dict[type, LayerSupport] = {e.kind: e for e in [
    LayerSupport(nn.Linear, "input [..., in_features] (acts on the last dimension), bias optional",
                 _linear_options, _linear_shape, ("weight", "bias"), weighted=True),
    LayerSupport(nn.Conv2d, "input [C, H, W]; numeric padding, padding_mode='zeros', any stride / dilation / kernel "
                 "shape, groups=1, bias optional", _conv_options, _conv_shape, ("weight", "bias"), weighted=True),
    LayerSupport(nn.ReLU, "any input", _no_options, _same_shape),
    LayerSupport(nn.BatchNorm1d, "input [C] or [C, L]; eval mode needs running statistics", _bn_options, _bn1d_shape,
                 ("weight", "bias", "running_mean", "running_var")),
    LayerSupport(nn.BatchNorm2d, "input [C, H, W]; eval mode needs running statistics", _bn_options, _bn2d_shape,
                 ("weight", "bias", "running_mean", "running_var")),
    LayerSupport(nn.AvgPool2d, "input [C, H, W]; ceil_mode=False, divisor_override=None, count_include_pad=True "
                 "or padding=0", _avgpool_options, _avgpool_shape),
    LayerSupport(nn.Flatten, "Flatten(start_dim=1, end_dim=-1)", _flatten_options, _flatten_shape),
    LayerSupport(Normalize, "input [C, H, W] with C = len(mean)", _no_options, _normalize_shape, ("mean", "std")),
]}

# The layer types with a weight matrix / kernel (IBP initialisation, L1 penalty).
WEIGHTED_LAYERS: tuple[type, ...] = tuple(t for t, e in SUPPORTED_LAYERS.items() if e.weighted)

_HINTS = {
    nn.Identity: "remove it (a no-op)",
    nn.Dropout: "remove it (a no-op in eval mode; it has no bound rule)",
}


class LayerRules(dict):
    """One algorithm's rules, keyed by layer type (``@TABLE.register(nn.Linear, ...)`` fills it). Every
    table registers itself in :data:`RULE_TABLES` under its algorithm's name, and
    ``tests/soundness/test_layer_support.py`` checks that each has a rule for every :data:`SUPPORTED_LAYERS`
    entry. ``by_hierarchy``: :meth:`find` also looks along the layer's base classes (an ``isinstance``
    lookup) instead of the exact type only."""

    def __init__(self, algorithm: str, by_hierarchy: bool = False) -> None:
        super().__init__()
        self.algorithm, self.by_hierarchy = algorithm, by_hierarchy
        RULE_TABLES[algorithm] = self

    def register(self, *types: type) -> Callable[[Any], Any]:
        def deco(rule: Any) -> Any:
            for t in types:
                self[t] = rule
            return rule
        return deco

    def rule_for(self, module: nn.Module, label: str) -> Any:
        """The rule of ``module``'s type (:meth:`find`); TypeError naming the supported layers when none."""
        rule = self.find(type(module))
        if rule is None:
            known = ", ".join(sorted(t.__name__ for t in self))
            raise TypeError(f"no {label} rule for layer {type(module).__name__}; supported layers: {known}")
        return rule

    def find(self, kind: type) -> Any:
        """The rule of layer type ``kind`` (or of its nearest registered base class, ``by_hierarchy``), or None."""
        for k in (kind.__mro__ if self.by_hierarchy else (kind,)):
            if k in self:
                return self[k]
        return None


# Every algorithm's rule table by algorithm name (filled as the algorithms' modules are imported).
RULE_TABLES: dict[str, LayerRules] = {}


def supported_layers_text() -> str:
    """One line per supported layer type: what of it is supported."""
    return "; ".join(f"{t.__name__} ({e.supported})" for t, e in SUPPORTED_LAYERS.items())


# ---------------------------------------------------------------------------------------------------
# Hooks and reparametrisations: model(x) would differ from the function the bound rules read.

def _global_hooks() -> list[str]:
    import torch.nn.modules.module as mod
    names = {"_global_forward_hooks": "forward", "_global_forward_pre_hooks": "forward pre",
             "_global_backward_hooks": "backward", "_global_backward_pre_hooks": "backward pre"}
    return [what for attr, what in names.items() if getattr(mod, attr, None)]


def _hook_kind(hook) -> str | None:
    """A specific name for the pre-hooks that torch's reparametrisations install."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    if isinstance(hook, prune.BasePruningMethod):
        return (f"pruned by torch.nn.utils.prune ({type(hook).__name__} on {getattr(hook, '_tensor_name', '?')!r}); "
                "make the pruning permanent with torch.nn.utils.prune.remove(module, name) first")
    if isinstance(hook, WeightNorm):
        return ("wrapped in torch.nn.utils.weight_norm (a forward pre-hook recomputes the weight); remove it with "
                "torch.nn.utils.remove_weight_norm(module) first")
    if isinstance(hook, SpectralNorm):
        return ("wrapped in torch.nn.utils.spectral_norm (a forward pre-hook rescales the weight, and power "
                "iterations change it in training mode); remove it with torch.nn.utils.remove_spectral_norm(module) "
                "first")
    return None


def _module_hooks(m: nn.Module) -> str | None:
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(m):
        names = ", ".join(sorted(m.parametrizations.keys()))
        return (f"has parametrizations on {names} (torch.nn.utils.parametrize, e.g. "
                "torch.nn.utils.parametrizations.weight_norm / spectral_norm): the bound rules would read the "
                "original tensors; bake them in first with torch.nn.utils.parametrize.remove_parametrizations("
                "module, name, leave_parametrized=True)")
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
        for hook in (getattr(m, attr, None) or {}).values():
            kind = _hook_kind(hook)
            if kind is not None:
                return f"is {kind}"
    kinds = [what for attr, what in (("_forward_pre_hooks", "forward pre"), ("_forward_hooks", "forward"),
                                     ("_backward_pre_hooks", "backward pre"), ("_backward_hooks", "backward"))
             if getattr(m, attr, None)]
    if kinds:
        return (f"has {' and '.join(kinds)} hooks: attacks and counterexample checks run model(x) with the hooks "
                "while the bound rules read the parameters without them, so a verdict would be about another "
                "function; remove the hooks (handle.remove()) first")
    if "forward" in m.__dict__:
        return "has a forward method set on the instance: the bound rules do not run it; remove it"
    left = [n for n in m._parameters if n.endswith("_orig")] + [n for n in m._buffers if n.endswith("_mask")]
    if left:
        return (f"carries pruning / reparametrisation tensors {sorted(left)} (torch.nn.utils.prune, spectral_norm): "
                "make them permanent first (prune.remove / remove_spectral_norm)")
    return None


# ---------------------------------------------------------------------------------------------------
# The chain and the check.

def _chain(model: nn.Module, names: dict[int, str]) -> list[tuple[str, nn.Module]]:
    """The layers in forward order, with their module paths; refuses containers whose order is not the
    forward order."""
    def where(m: nn.Module) -> str:
        return names.get(id(m)) or "<model>"

    t = type(model)
    if t is CertifiableNet:
        if type(model.features) is not nn.Sequential:
            raise UnsupportedNetworkError(f"features ({type(model.features).__name__}) of the CertifiableNet must be "
                                          "an nn.Sequential of supported layers")
        out = []
        for m in [*model.features, model.head]:
            if isinstance(m, nn.Sequential):
                raise UnsupportedNetworkError(
                    f"module {where(m)!r} (Sequential): a nested nn.Sequential inside CertifiableNet.features is not supported "
                    "(CertifiableNet.layers() does not flatten it); put its layers into features directly")
            out.append((where(m), m))
        return out
    if t is nn.Sequential:
        out = []
        for m in model:
            out.extend(_chain(m, names) if type(m) is nn.Sequential else [(where(m), m)])
        return out
    if isinstance(model, (CertifiableNet, nn.Sequential)):
        raise UnsupportedNetworkError(
            f"module {where(model)!r} ({t.__name__}): subclasses of {'CertifiableNet' if isinstance(model, CertifiableNet) else 'nn.Sequential'} "
            "are not supported (their forward may differ from the chain of layers the bounds walk); use the class itself")
    raise UnsupportedNetworkError(
        f"module {where(model)!r} ({t.__name__}): expected a CertifiableNet or an nn.Sequential (a chain of supported "
        f"layers), whose layers run in their listed order; got {t.__name__}")


def check_supported(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[nn.Module]:
    """Check ``model`` against the layer-support contract (module docstring, :data:`SUPPORTED_LAYERS`)
    and return its chain of layers. ``input_shape``: the per-sample input shape (without the batch
    dimension); with it the input shape of every layer is checked too.

    Raises :class:`UnsupportedNetworkError` (a ValueError) naming the module path, its type and the
    unsupported option, hook or container, and what is supported. Cheap: one walk over the modules,
    no tensor operations."""
    hooks = _global_hooks()
    if hooks:
        raise UnsupportedNetworkError(
            f"global module {' and '.join(hooks)} hooks are registered (torch.nn.modules.module."
            "register_module_*_hook): they change what model(x) computes for every module, but not the bounds; "
            "remove them before training, bounding, verifying or exporting")
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name or "<model>")
        why = _module_hooks(m)
        if why is not None:
            raise UnsupportedNetworkError(f"module {name or '<model>'!r} ({type(m).__name__}) {why}")
    chain = _chain(model, names)
    if not chain or type(chain[-1][1]) is not nn.Linear:
        as_certifiable(model)  # raises its TypeError (the last layer must be an nn.Linear)
    shape = None if input_shape is None else tuple(int(v) for v in input_shape)
    aliases_input = True  # the current activation may be a view of the network's input
    for k, (path, m) in enumerate(chain):
        entry = SUPPORTED_LAYERS.get(type(m))
        label = f"module {path!r} ({type(m).__name__})"
        if entry is None:
            base = next((t for t in SUPPORTED_LAYERS if isinstance(m, t)), None)
            hint = _HINTS.get(type(m))
            why = (f"a subclass of {base.__name__} is not supported (its forward may differ from the rules); use "
                   f"{base.__name__} itself" if base is not None else
                   f"layer type {type(m).__name__} is not supported" + (f": {hint}" if hint else ""))
            known = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise UnsupportedNetworkError(f"{label}: {why}; supported layers: {known} (certdist.models.support)")
        try:
            for p in entry.params:
                if getattr(m, p, None) is not None and p not in m._parameters and p not in m._buffers:
                    raise _Refuse(f"its {p!r} is a plain attribute, not a parameter or buffer (a reparametrisation "
                                  "left behind?)")
            entry.options(m)
            if isinstance(m, nn.ReLU) and m.inplace and aliases_input:
                raise _Refuse("inplace=True before any computing layer would overwrite the caller's input; "
                              "use nn.ReLU()")
            if shape is not None:
                if k == len(chain) - 1 and len(shape) != 1:
                    raise _Refuse(f"the classification head needs a flat input [n], got per-sample shape {shape}; "
                                  "put an nn.Flatten() before it")
                shape = entry.shape(m, shape)
        except _Refuse as e:
            raise UnsupportedNetworkError(f"{label}: {e}; supported {type(m).__name__}: {entry.supported}") from None
        aliases_input = aliases_input and isinstance(m, nn.Flatten)
    return [m for _, m in chain]


__all__ = ["ALGORITHMS", "LayerRules", "LayerSupport", "RULE_TABLES", "SUPPORTED_LAYERS", "UnsupportedNetworkError",
           "WEIGHTED_LAYERS", "check_supported", "supported_layers_text"]
