"""The architectures of the certified-training literature.

DM-small / DM-medium / DM-large: Gowal et al. 2018 ("On the effectiveness of interval bound propagation").
CNN7: Shi et al. 2021 ("Fast certified robust training with short warmup"), BatchNorm after every
conv/linear layer but the last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from certdist.models.layers import Normalize


@dataclass(frozen=True)
class InputSpec:
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class CertifiableNet(nn.Module):
    """``head(features(x))``: a feature extractor (Normalize first) and a final linear layer.

    ``features`` and ``head`` are kept apart because distillation needs the penultimate features.
    ``arch`` and ``input_spec`` identify the architecture so checkpoints can be checked on load
    (``input_spec`` is ``None`` for a view of a user's ``nn.Sequential``, see :func:`as_certifiable`).
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear, arch: str, input_spec: InputSpec | None) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.arch = arch
        self.input_spec = input_spec

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def layers(self) -> list[nn.Module]:
        """The flat chain of layers that bound propagation walks through."""
        return [*self.features, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.head(h), h

    def describe(self) -> dict:
        return {"arch": self.arch, **(self.input_spec.__dict__ if self.input_spec is not None else {})}


def flat_layers(model: nn.Module) -> list[nn.Module]:
    """The chain of layers of a :class:`CertifiableNet` (``model.layers()``) or of an ``nn.Sequential``
    (nested ``nn.Sequential`` blocks flattened)."""
    if hasattr(model, "layers") and callable(model.layers):
        return list(model.layers())
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected a CertifiableNet or an nn.Sequential (a chain of supported layers), got "
                        f"{type(model).__name__}")
    out: list[nn.Module] = []
    for m in model:
        out.extend(flat_layers(m) if isinstance(m, nn.Sequential) else [m])
    return out


def check_float32(model: nn.Module, what: str) -> None:
    """Raise ValueError unless every floating parameter and buffer of ``model`` is float32: verdicts and
    metrics are about the float32 network (the verifier's rounding tolerance is float32's)."""
    bad = sorted({str(t.dtype) for t in [*model.parameters(), *model.buffers()]
                  if t.is_floating_point() and t.dtype != torch.float32})
    if bad:
        raise ValueError(f"{what} needs a float32 model (verdicts are about the float32 network, with float32's "
                         f"rounding tolerance), got parameters/buffers of dtype {', '.join(bad)}; convert it "
                         "with model.float()")


def as_certifiable(model: nn.Module) -> CertifiableNet:
    """``model`` as a :class:`CertifiableNet`: itself if it is one, else (an ``nn.Sequential``) a view
    whose ``features`` are all layers but the last and whose ``head`` is the final ``nn.Linear``.

    The view shares the modules (and so the parameters) of ``model``: training, ``.eval()`` or
    ``.to()`` on one acts on the other. Its ``arch`` is ``"sequential"`` and ``input_spec`` is None."""
    if isinstance(model, CertifiableNet):
        return model
    layers = flat_layers(model)
    if not layers or not isinstance(layers[-1], nn.Linear):
        last = type(layers[-1]).__name__ if layers else "nothing"
        raise TypeError(f"the last layer of the network must be an nn.Linear (the classification head that "
                        f"distillation and the margin bounds split off), got {last}")
    view = CertifiableNet(nn.Sequential(*layers[:-1]), layers[-1], "sequential", None)
    view.training = view.features.training = model.training  # the mode callers save and restore is the model's
    return view


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    out = (size + 2 * p - k) // s + 1
    if out <= 0:
        raise ValueError(f"input of size {size} is too small for a {k}x{k} convolution with stride {s}")
    return out


def _build(spec: InputSpec, convs: Sequence[tuple[int, int, int, int]], fcs: Sequence[int],
           batchnorm: bool, arch: str) -> CertifiableNet:
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std)]
    c, size = spec.channels, spec.size
    for out_c, k, s, p in convs:
        layers.append(nn.Conv2d(c, out_c, k, stride=s, padding=p))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_c))
        layers.append(nn.ReLU())
        c, size = out_c, _conv_out(size, k, s, p)
    layers.append(nn.Flatten())
    n = c * size * size
    for width in fcs:
        layers.append(nn.Linear(n, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        n = width
    return CertifiableNet(nn.Sequential(*layers), nn.Linear(n, spec.num_classes), arch, spec)


def dm_small(spec: InputSpec) -> CertifiableNet:
    return _build(spec, [(16, 4, 2, 0), (32, 4, 1, 0)], [100], batchnorm=False, arch="dm_small")


def dm_medium(spec: InputSpec) -> CertifiableNet:
    return _build(spec, [(32, 3, 1, 0), (32, 4, 2, 0), (64, 3, 1, 0), (64, 4, 2, 0)], [512, 512],
                  batchnorm=False, arch="dm_medium")


def dm_large(spec: InputSpec) -> CertifiableNet:
    return _build(spec, [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], [512],
                  batchnorm=False, arch="dm_large")


def cnn7(spec: InputSpec) -> CertifiableNet:
    return _build(spec, [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], [512],
                  batchnorm=True, arch="cnn7")


def mlp(spec: InputSpec, widths: Sequence[int] = (64, 64), batchnorm: bool = False) -> CertifiableNet:
    """A small fully-connected net (tests, tiny verification problems)."""
    return _build(spec, [], list(widths), batchnorm=batchnorm, arch="mlp")


MODELS: dict[str, Callable[[InputSpec], CertifiableNet]] = {
    "dm_small": dm_small,
    "dm_medium": dm_medium,
    "dm_large": dm_large,
    "cnn7": cnn7,
    "mlp": mlp,
}
