"""A ReLU network as a chain of dense affine maps, for complete verification (MILP, BaB).

Every run of affine layers between two ReLUs (Normalize, Conv2d, Linear, Flatten, eval-mode
BatchNorm, AvgPool2d, ...) is folded into one dense matrix in float64, so that

    z_0 = W_0 x + b_0,   z_k = W_k relu(z_{k-1}) + b_k,   logits = z_L.

Also here: batched CROWN bounds on this chain (Zhang et al. 2018) with optional split constraints,
the building block of the branch-and-bound verifier, and the intermediate pre-activation bounds that
the MILP big-M formulation needs. Only for networks whose dense matrices fit in memory.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from certdist.models.cnn import flat_layers
from certdist.models.layers import Normalize
from certdist.models.support import LayerRules
from certdist.propagation.ibp import check_fixed_batchnorm

# How the dense form reads each layer type (looked up along the layer's class hierarchy, :func:`dense_role`):
# a ReLU ends an affine block, an affine layer is folded into its block by its torch forward. Every type of
# the layer-support contract (:data:`certdist.models.support.SUPPORTED_LAYERS`) has a role
# (tests/soundness/test_layer_support.py).
DENSE_ROLES = LayerRules("dense", by_hierarchy=True)  # layer type -> "relu" | "affine"
DENSE_ROLES[nn.ReLU] = "relu"
DENSE_ROLES.update({t: "affine" for t in (Normalize, nn.Conv2d, nn.Linear, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d,
                                          nn.AvgPool2d, nn.Identity, nn.Dropout)})
AFFINE_TYPES: tuple[type, ...] = tuple(t for t, role in DENSE_ROLES.items() if role == "affine")


def dense_role(m: nn.Module) -> str | None:
    """``"relu"``, ``"affine"`` or None (no role: the dense form refuses the layer)."""
    return DENSE_ROLES.find(type(m))


class TooLargeError(ValueError):
    """The network does not fit the dense representation (too many weights)."""


@dataclass(frozen=True)
class DenseNet:
    """``weights[k]``: [n_k, n_{k-1}] (float64); ReLU after every map but the last."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    input_shape: tuple[int, ...]
    relu_shapes: list[tuple[int, ...]]

    @property
    def num_relu_layers(self) -> int:
        return len(self.weights) - 1

    @property
    def widths(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations of every ReLU layer and the logits, for flat inputs ``x`` [B, n_0]."""
        out, a = [], x.to(torch.float64)
        for k, (W, b) in enumerate(zip(self.weights, self.biases)):
            z = a @ W.T + b
            out.append(z)
            a = z.clamp(min=0)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.preactivations(x)[-1]


def _fold(block: list[nn.Module], in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    seq = copy.deepcopy(nn.Sequential(*block)).double().eval()
    n = int(torch.tensor(in_shape).prod())
    with torch.no_grad():
        b = seq(torch.zeros(1, *in_shape, dtype=torch.float64))
        W = seq(torch.eye(n, dtype=torch.float64).view(n, *in_shape)) - b
    return W.flatten(1).T.contiguous(), b.flatten(), tuple(b.shape[1:])


def dense_from_model(model: nn.Module, input_shape: tuple[int, ...], max_weights: int = 20_000_000) -> DenseNet:
    """Fold ``model.layers()`` (eval mode) into a :class:`DenseNet`. Raises :class:`TooLargeError`
    if a dense matrix would exceed ``max_weights`` entries and TypeError on an unsupported layer."""
    layers = flat_layers(model)
    blocks: list[list[nn.Module]] = [[]]
    for m in layers:
        check_fixed_batchnorm(m, eval_mode=True)  # the dense form is that of the eval-mode network
        role = dense_role(m)
        if role == "relu":
            blocks.append([])
        elif role == "affine":
            blocks[-1].append(m)
        else:
            raise TypeError(f"complete verification does not support layer {type(m).__name__}; "
                            f"supported: ReLU, {', '.join(t.__name__ for t in AFFINE_TYPES)}")
    weights, biases, shapes = [], [], []
    shape = tuple(input_shape)
    for block in blocks:
        n_in = int(torch.tensor(shape).prod())
        W, b, shape = _fold(block, shape) if block else (torch.eye(n_in, dtype=torch.float64),
                                                         torch.zeros(n_in, dtype=torch.float64), shape)
        if W.numel() > max_weights:
            raise TooLargeError(f"dense layer of {W.shape[0]}x{W.shape[1]} exceeds max_weights={max_weights}")
        weights.append(W)
        biases.append(b)
        shapes.append(shape)
    return DenseNet(weights, biases, tuple(input_shape), shapes[:-1])


# ---------------------------------------------------------------------------------------------
# CROWN on the dense chain, batched over D domains (subproblems) that share the network.

@dataclass
class BackwardResult:
    lower: torch.Tensor                 # [D, S] lower bounds of A z_k
    minimiser: torch.Tensor             # [D, S, n_0] input point attaining the linear bound
    scores: list[torch.Tensor] | None   # per ReLU layer [D, S, n_j]: relaxation looseness weights


def relu_relaxation(l: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor | None = None):
    """Slopes/intercepts of the linear lower (``a >= sl z``) and upper (``a <= su z + tu``) bounds of
    ReLU on [l, u]; adaptive lower slope unless ``alpha`` is given."""
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    den = (u - l).clamp(min=1e-30)
    su = torch.where(active, torch.ones_like(u), torch.where(unstable, u / den, torch.zeros_like(u)))
    tu = torch.where(unstable, -l * u / den, torch.zeros_like(u))
    if alpha is None:
        sl_unstable = (u > -l).to(l.dtype)
    else:
        sl_unstable = alpha
    sl = torch.where(active, torch.ones_like(u), torch.where(unstable, sl_unstable, torch.zeros_like(u)))
    return sl, su, tu


def backward_lower(net: DenseNet, k: int, A: torch.Tensor, lbs: list[torch.Tensor], ubs: list[torch.Tensor],
                   x_lo: torch.Tensor, x_hi: torch.Tensor, alphas: list[torch.Tensor] | None = None,
                   betas: list[torch.Tensor] | None = None, want_scores: bool = False) -> BackwardResult:
    """Lower bound of ``A z_k`` (``A``: [D, S, n_k]) over the input box [x_lo, x_hi] ([D, n_0]) given
    pre-activation bounds ``lbs/ubs[j]`` ([D, n_j]) for the ReLU layers j < k.

    ``alphas[j]``: lower slopes of the unstable ReLUs ([D, S or 1, n_j]; default adaptive).
    ``betas[j]``: Lagrange terms of split constraints (beta-CROWN, Wang et al. 2021) already signed:
    ``-beta`` for a split ``z >= 0``, ``+beta`` for ``z <= 0`` (beta >= 0), zero elsewhere; adding
    ``sum betas[j] z_j`` (<= 0 on the domain) keeps the bound sound."""
    bias = torch.zeros(A.shape[:2], dtype=A.dtype)
    scores = [] if want_scores else None
    for j in range(k, -1, -1):
        if betas is not None and j < k:
            A = A + betas[j]
        bias = bias + A @ net.biases[j]
        A = A @ net.weights[j]
        if j == 0:
            break
        l, u = lbs[j - 1].unsqueeze(1), ubs[j - 1].unsqueeze(1)
        alpha = None if alphas is None else alphas[j - 1]
        sl, su, tu = relu_relaxation(l, u, alpha)
        A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
        bias = bias + (A_neg * tu).sum(-1)
        if want_scores:
            scores.insert(0, (-A_neg * tu).detach())
        A = A_pos * sl + A_neg * su
    lo, hi = x_lo.unsqueeze(1), x_hi.unsqueeze(1)
    minimiser = torch.where(A >= 0, lo, hi)
    lower = bias + (A * minimiser).sum(-1)
    return BackwardResult(lower, minimiser.detach(), scores)


def ibp_bounds(net: DenseNet, x_lo: torch.Tensor, x_hi: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Interval bounds of every ReLU layer's pre-activation (flat, [D, n_k])."""
    lbs, ubs = [], []
    lo, hi = x_lo, x_hi
    for W, b in zip(net.weights[:-1], net.biases[:-1]):
        c, r = (lo + hi) / 2, (hi - lo) / 2
        zc, zr = c @ W.T + b, r @ W.abs().T
        lbs.append(zc - zr)
        ubs.append(zc + zr)
        lo, hi = lbs[-1].clamp(min=0), ubs[-1].clamp(min=0)
    return lbs, ubs


def crown_bounds(net: DenseNet, x_lo: torch.Tensor, x_hi: torch.Tensor,
                 lbs: list[torch.Tensor] | None = None, ubs: list[torch.Tensor] | None = None,
                 splits: list[torch.Tensor] | None = None, start: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """CROWN bounds of the ReLU layers' pre-activations, layer by layer, intersected with the given
    ``lbs/ubs`` (if any) and with the ``splits`` (+1: z >= 0, -1: z <= 0, 0: free). Layers before
    ``start`` are taken as given."""
    D = x_lo.shape[0]
    base_l, base_u = (lbs, ubs) if lbs is not None else ibp_bounds(net, x_lo, x_hi)
    new_l, new_u = list(base_l[:start]), list(base_u[:start])
    for k in range(start, net.num_relu_layers):
        n = net.weights[k].shape[0]
        eye = torch.eye(n, dtype=torch.float64).expand(D, n, n)
        A = torch.cat([eye, -eye], dim=1)
        low = backward_lower(net, k, A, new_l, new_u, x_lo, x_hi).lower
        l = torch.maximum(low[:, :n], base_l[k])
        u = torch.minimum(-low[:, n:], base_u[k])
        if splits is not None:
            l = torch.where(splits[k] > 0, l.clamp(min=0), l)
            u = torch.where(splits[k] < 0, u.clamp(max=0), u)
        new_l.append(l)
        new_u.append(u)
    return new_l, new_u


def count_unstable(lbs: list[torch.Tensor], ubs: list[torch.Tensor]) -> int:
    return int(sum(((l < 0) & (u > 0)).sum() for l, u in zip(lbs, ubs)))
