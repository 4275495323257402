"""A declarative, JSON-able description of a network (its layers and their constructor arguments), saved
in checkpoints next to the weights so that any checkpoint, a user's own ``nn.Sequential`` trained with
:func:`certdist.fit` included, can be rebuilt without its Python code and without unpickling anything.

    {"format": "certdist-architecture/1", "root": NODE}
    NODE: {"type": "Sequential", "children": [[name, NODE], ...]}
        | {"type": "CertifiableNet", "arch": str, "input_spec": {...} | None, "features": NODE, "head": NODE}
        | {"type": "<layer>", "args": {...}}        (one of LAYERS)

Only the layers the bound propagation supports are described; anything else (another module, or a
subclass of a supported one, whose ``forward`` may differ) is refused with :class:`DescriptionError`
naming it (an ``nn.Sequential`` subclass that keeps ``Sequential.forward`` is described as a plain
``nn.Sequential``: the bounds see the same chain of layers). Weights and buffers are not part of the description: they are the checkpoint's state dict,
whose keys the rebuilt module reproduces exactly (names of nested ``nn.Sequential`` children included).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from certdist.models.cnn import CertifiableNet, InputSpec
from certdist.models.layers import Normalize

FORMAT = "certdist-architecture/1"


class DescriptionError(ValueError):
    """A module that cannot be described (or a description that cannot be built)."""


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _attrs(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {n: _plain(getattr(m, n)) for n in names}


def _bias(m: nn.Module) -> dict:
    return {"bias": m.bias is not None}


# layer type -> (constructor arguments of an instance, constructor)
LAYERS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict]]] = {
    "Normalize": (Normalize, lambda m: {"mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()}),
    "Flatten": (nn.Flatten, _attrs("start_dim", "end_dim")),
    "ReLU": (nn.ReLU, lambda m: {}),
    "Linear": (nn.Linear, lambda m: _attrs("in_features", "out_features")(m) | _bias(m)),
    "Conv2d": (nn.Conv2d, lambda m: _attrs("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                           "dilation", "groups", "padding_mode")(m) | _bias(m)),
    "AvgPool2d": (nn.AvgPool2d, _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                       "divisor_override")),
    "BatchNorm1d": (nn.BatchNorm1d, _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")),
}
_BY_CLASS = {cls: name for name, (cls, _) in LAYERS.items()}


def _describe(m: nn.Module, where: str) -> dict:
    kind = type(m)
    if kind is nn.Sequential or (isinstance(m, nn.Sequential) and kind.forward is nn.Sequential.forward):
        return {"type": "Sequential", "children": [[name, _describe(c, f"{where}.{name}" if where else name)]
                                                   for name, c in m.named_children()]}
    if kind is CertifiableNet:
        spec = m.input_spec
        return {"type": "CertifiableNet", "arch": m.arch,
                "input_spec": None if spec is None else {k: _plain(v) for k, v in spec.__dict__.items()},
                "features": _describe(m.features, f"{where}.features" if where else "features"),
                "head": _describe(m.head, f"{where}.head" if where else "head")}
    if kind in _BY_CLASS:
        name = _BY_CLASS[kind]
        return {"type": name, "args": LAYERS[name][1](m)}
    known = ", ".join(["Sequential", "CertifiableNet", *LAYERS])
    raise DescriptionError(f"cannot describe layer {where or '(the model itself)'!r} of type {kind.__module__}."
                           f"{kind.__qualname__}: a checkpoint can rebuild only these module types (exactly, not "
                           f"subclasses): {known}")


def describe(model: nn.Module) -> dict:
    """The JSON-able description of ``model`` (see the module docstring); :class:`DescriptionError` names
    the first module that cannot be described."""
    return {"format": FORMAT, "root": _describe(model, "")}


def _build(node: dict, where: str) -> nn.Module:
    kind = node.get("type")
    if kind == "Sequential":
        seq = nn.Sequential()
        for name, child in node["children"]:
            seq.add_module(name, _build(child, f"{where}.{name}" if where else name))
        return seq
    if kind == "CertifiableNet":
        spec = node.get("input_spec")
        spec = None if spec is None else InputSpec(**{k: _tuple(v) for k, v in spec.items()})
        return CertifiableNet(_build(node["features"], "features"), _build(node["head"], "head"), node["arch"], spec)
    if kind not in LAYERS:
        raise DescriptionError(f"layer {where!r}: unknown type {kind!r} in the architecture description; known: "
                               f"{', '.join(['Sequential', 'CertifiableNet', *LAYERS])}")
    args = {k: _tuple(v) for k, v in node.get("args", {}).items()}
    try:
        return LAYERS[kind][0](**args)
    except (TypeError, ValueError) as e:
        raise DescriptionError(f"layer {where!r} ({kind}): cannot build it from {args}: {e}") from e


def build_from_description(description: dict) -> nn.Module:
    """The module a :func:`describe` result describes, with freshly initialised weights (load the
    checkpoint's state dict into it)."""
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        fmt = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise DescriptionError(f"unsupported architecture description format {fmt!r}; this certdist reads {FORMAT!r}")
    return _build(description["root"], "")
