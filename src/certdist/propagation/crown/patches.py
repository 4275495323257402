"""Patches: CROWN for the neurons of a convolutional feature map without dense specifications (windows of
the backward coefficients, see the comment below); used for intermediate bounds by
:mod:`certdist.propagation.crown.intermediate`."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval
from certdist.models.layers import Normalize
from certdist.propagation.crown.chain import Chain, _chunk_budget, _chunks
from certdist.propagation.crown.rules import _fast_layout, _hw, relu_relaxation


# ---------------------------------------------------------------------------------------------------
# Patches: CROWN for the neurons of a convolutional feature map without dense specifications.
#
# Every neuron (sample b, channel c, position (oh, ow)) of the feature map ``shapes[end]`` depends on a
# window of each earlier feature map: positions ``o * S - P + [0, K)`` per spatial axis. Its backward
# coefficients are kept as that window only, ``[N, C, Kh, Kw]`` for N neurons (one row each), and a
# convolution maps a window through ``conv_transpose2d`` without padding (``K -> (K - 1) s + d (k - 1) + 1``,
# ``S -> S s``, ``P -> P s + p``). Per-position tensors (ReLU relaxations, the input box) are cut into the
# same windows with ``unfold`` (zero padding), so coefficients of positions outside a feature map vanish at
# the next ReLU or at the input; after a padded convolution they are masked to zero at once, so that bias
# terms only ever see real neurons. Before the first ReLU the coefficients do not depend on the sample or
# the position: they are computed once per channel.

_PATCH_LAYERS = (nn.Conv2d, nn.AvgPool2d, nn.ReLU, nn.BatchNorm2d, Normalize)


def _patchable(chain: Chain, end: int) -> bool:
    """Whether the neurons of ``layers[:end]``'s output can be bounded with windows."""
    if len(chain.shapes[end]) != 3 or len(chain.shapes[0]) != 3:
        return False
    for m in chain.layers[:end]:
        if not isinstance(m, _PATCH_LAYERS):
            return False
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return False
        if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None
                                            or (not m.count_include_pad and any(_hw(m.padding)))):
            return False
    return True


def _window_geometry(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(kernel, stride, padding, dilation)`` pairs of a Conv2d or AvgPool2d."""
    if isinstance(m, nn.Conv2d):
        return tuple(m.weight.shape[2:]), _hw(m.stride), _hw(m.padding), _hw(m.dilation)
    return _hw(m.kernel_size), _hw(m.stride if m.stride is not None else m.kernel_size), _hw(m.padding), (1, 1)


@dataclass(frozen=True)
class _Windows:
    """Where the windows of a chunk of neuron rows lie, and how the rows are laid out.

    Grid layout (``b is None``): every position of channels ``c`` of ``nb`` consecutive samples; windowed
    tensors are ``[nb or 1, nc, L or 1, C, Kh, Kw]`` with ``L = H0 W0`` positions. Sparse layout: one
    row per selected neuron, sample ``b`` (within the chunk), channel ``c``, position ``oh``/``ow`` [N];
    windowed tensors are ``[N, C, Kh, Kw]``. ``K``, ``S``, ``P``: window size, stride and padding (pairs)
    on the current feature map."""

    out_hw: tuple[int, int]
    c: torch.Tensor
    b: torch.Tensor | None = None
    oh: torch.Tensor | None = None
    ow: torch.Tensor | None = None
    K: tuple[int, int] = (1, 1)
    S: tuple[int, int] = (1, 1)
    P: tuple[int, int] = (0, 0)

    def through(self, m: nn.Module) -> "_Windows":
        k, s, p, d = _window_geometry(m)
        K = tuple((self.K[j] - 1) * s[j] + d[j] * (k[j] - 1) + 1 for j in range(2))
        return replace(self, K=K, S=tuple(self.S[j] * s[j] for j in range(2)),
                       P=tuple(self.P[j] * s[j] + p[j] for j in range(2)))

    def rows(self, A: torch.Tensor) -> torch.Tensor:
        """The shared-phase windows [C0, C, Kh, Kw] (one per channel) laid out as rows."""
        A = A[self.c]
        return A if self.b is not None else A.unsqueeze(0).unsqueeze(2)

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        """The windows of ``t`` [b, C, H, W] (zero outside the map; ``b = 1``: the same for every sample)
        in this layout."""
        C, H, W = t.shape[1:]
        lh = (H + 2 * self.P[0] - self.K[0]) // self.S[0] + 1
        lw = (W + 2 * self.P[1] - self.K[1]) // self.S[1] + 1
        u = F.unfold(t, self.K, padding=self.P, stride=self.S).transpose(1, 2)  # [b, lh * lw, C*Kh*Kw]
        if self.b is None:
            h0, w0 = self.out_hw
            if (lh, lw) != (h0, w0):
                u = u.reshape(-1, lh, lw, u.shape[-1])[:, :h0, :w0]
            return u.reshape(-1, 1, h0 * w0, C, *self.K)
        rows = self.oh * lw + self.ow
        if t.shape[0] > 1:
            rows = rows + self.b * (lh * lw)
        return u.reshape(-1, u.shape[-1])[rows].view(-1, C, *self.K)

    def mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """1 on the window positions inside a feature map of ``shape``, 0 outside."""
        return self.cut(torch.ones((1, 1, *shape[1:]), dtype=like.dtype, device=like.device))


def _window_transpose(A: torch.Tensor, w: torch.Tensor, s, groups: int, d) -> torch.Tensor:
    """``conv_transpose2d`` of windows ``A`` [..., C, Kh, Kw] without padding. Through a layer with few
    input channels per output (the first convolution of an image net) CPU transposed convolutions are
    slow: there the window-to-window map (a matrix of ``C Kh Kw`` rows, built once) is a matmul."""
    lead, n_in = A.shape[:-3], A.shape[-3:].numel()
    flat = A.reshape(-1, *A.shape[-3:])
    if w.shape[1] * w.shape[2] * w.shape[3] > 64 or flat.shape[0] < 4 * n_in:
        out = F.conv_transpose2d(_fast_layout(flat), w, None, s, 0, 0, groups, d).contiguous()
    else:
        basis = torch.eye(n_in, dtype=A.dtype, device=A.device).view(n_in, *A.shape[-3:])
        M = F.conv_transpose2d(basis, w, None, s, 0, 0, groups, d)
        out = (flat.reshape(-1, n_in) @ M.flatten(1)).view(-1, *M.shape[1:])
    return out.view(*lead, *out.shape[1:])


def _patch_affine(m: nn.Module, i: int, chain: Chain, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One affine layer backwards on windows ``A`` [..., C, Kh, Kw]: the new windows and the bias term."""
    if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
        _, s, _, d = _window_geometry(m)
        if isinstance(m, nn.Conv2d):
            w, groups, b = m.weight, m.groups, m.bias
        else:
            channels, k = chain.shapes[i][0], _hw(m.kernel_size)
            w = torch.full((channels, 1, *k), 1.0 / (k[0] * k[1]), dtype=A.dtype, device=A.device)
            groups, b = channels, None
        term = None if b is None else A.sum((-1, -2)) @ b
        return _window_transpose(A, w, s, groups, d), term
    if isinstance(m, Normalize):
        scale, shift = 1.0 / m.std.flatten(), (-m.mean / m.std).flatten()
    else:
        scale, shift = chain.affine[i]
    return A * scale.view(-1, 1, 1), A.sum((-1, -2)) @ shift


def _add(b: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    return b if term is None else b + term


def _window_dot(A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum(A * t)`` over the window dimensions; one matmul while ``A`` is still the same for every
    sample and position (grid layout [1, nc, 1, ...] against ``t`` [b, 1, L, ...])."""
    if A.dim() == 6 and A.shape[0] == 1 and A.shape[2] == 1 and t.shape[1] == 1:
        out = t.flatten(3) @ A.flatten(3)[0, :, 0].T  # [b, 1, L, nc]
        return out.squeeze(1).transpose(1, 2)
    return (A * t).sum((-1, -2, -3))


def _patch_bounds(chain: Chain, end: int, box: Interval, relax: dict[int, tuple], win: _Windows
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN lower and upper bounds of the neurons ``win`` lays out (of ``layers[:end]``'s output).
    ``box`` and ``relax`` (``(chord, intercept, adaptive lower slope)`` [b, *shape] by ReLU layer index)
    hold the samples of this chunk."""
    C0 = chain.shapes[end][0]
    # shared phase: one row per channel, the same for all samples and positions, until the first ReLU
    # or the first padded window (whose padding must be masked per position before any bias term)
    A = torch.eye(C0, dtype=box.lower.dtype, device=box.lower.device).view(C0, C0, 1, 1)
    bias = torch.zeros(C0, dtype=A.dtype, device=A.device)
    i = end - 1
    while i >= 0 and not isinstance(chain.layers[i], nn.ReLU) and not any(win.P):
        A, term = _patch_affine(chain.layers[i], i, chain, A)
        bias = _add(bias, term)
        win = win.through(chain.layers[i]) if isinstance(chain.layers[i], (nn.Conv2d, nn.AvgPool2d)) else win
        i -= 1
    lA = uA = win.rows(A)
    lb = ub = win.rows(bias.view(C0, 1, 1, 1)).squeeze(-1).squeeze(-1).squeeze(-1)
    if any(win.P):
        lA = uA = lA * win.mask(chain.shapes[i + 1], lA)
    for i in range(i, -1, -1):
        m = chain.layers[i]
        if isinstance(m, nn.ReLU):
            chord, intercept, lower = (win.cut(t) for t in relax[i])
            lb = lb + _window_dot(lA.clamp(max=0), intercept)
            ub = ub + _window_dot(uA.clamp(min=0), intercept)
            lA = lA * torch.where(lA >= 0, lower, chord)
            uA = uA * torch.where(uA >= 0, chord, lower)
            continue
        same = lA is uA
        lA, term = _patch_affine(m, i, chain, lA)
        lb = _add(lb, term)
        if same:
            uA, ub = lA, _add(ub, term)
        else:
            uA, term = _patch_affine(m, i, chain, uA)
            ub = _add(ub, term)
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
            win = win.through(m)
            if any(_window_geometry(m)[2]):  # a padded layer: drop the coefficients of its padding
                mask = win.mask(chain.shapes[i], lA)
                lA = lA * mask
                uA = lA if same else uA * mask
    center, radius = win.cut(box.center), win.cut(box.radius)
    lo = _window_dot(lA, center) - _window_dot(lA.abs(), radius) + lb
    up = _window_dot(uA, center) + _window_dot(uA.abs(), radius) + ub
    return lo, up


def _widest_window(chain: Chain, end: int) -> int:
    """The largest ``C * Kh * Kw`` of a neuron's window on the way back from ``layers[:end]``."""
    win = _Windows((1, 1), None)
    widest = chain.shapes[end][0]
    for i in range(end - 1, -1, -1):
        if isinstance(chain.layers[i], (nn.Conv2d, nn.AvgPool2d)):
            win = win.through(chain.layers[i])
        widest = max(widest, chain.shapes[i][0] * win.K[0] * win.K[1])
    return widest


def _crown_neurons_patches(chain: Chain, end: int, box: Interval, pre: dict[int, Interval],
                           select: torch.Tensor | None, max_memory: int) -> Interval | None:
    """:func:`_crown_neurons` for a convolutional feature map, with windows instead of dense specs."""
    B = box.lower.shape[0]
    C0, H0, W0 = chain.shapes[end]
    L, n = H0 * W0, C0 * H0 * W0
    dtype, device = box.lower.dtype, box.lower.device
    relax = {i: relu_relaxation(pre[i])[:3] for i in chain.relus if i < end}
    per_row = _widest_window(chain, end) * box.lower.element_size() * 12  # ~12 window tensors alive at once
    rows = max(1, _chunk_budget(max_memory, device, 12) // per_row)

    def run(samples: slice, win: _Windows):
        return _patch_bounds(chain, end, Interval(box.lower[samples], box.upper[samples]),
                             {i: tuple(t[samples] for t in r) for i, r in relax.items()}, win)

    if select is None:  # grid layout: all positions of a range of channels of a range of samples
        lo = torch.empty(B, C0, L, dtype=dtype, device=device)
        up = torch.empty_like(lo)
        c_size = max(1, min(C0, rows // L))
        b_size = max(1, rows // (C0 * L)) if c_size == C0 else 1
        for bs in _chunks(B, b_size):
            for cs in _chunks(C0, c_size):
                lo[bs, cs], up[bs, cs] = run(bs, _Windows((H0, W0), torch.arange(cs.start, cs.stop, device=device)))
        return Interval(lo.view(B, n), up.view(B, n))
    rows_b, rows_n = select.nonzero(as_tuple=True)
    if rows_b.numel() == 0:
        return None
    lows, ups = [], []
    for rs in _chunks(rows_b.numel(), rows):
        b, k = rows_b[rs], rows_n[rs]
        samples = slice(int(b[0]), int(b[-1]) + 1)  # rows are sorted by sample
        lo, up = run(samples, _Windows((H0, W0), k // L, b - samples.start, (k // W0) % H0, k % W0))
        lows.append(lo)
        ups.append(up)
    inf = torch.full((B, n), float("inf"), dtype=dtype, device=device)
    return Interval((-inf).index_put((rows_b, rows_n), torch.cat(lows)),
                    inf.index_put((rows_b, rows_n), torch.cat(ups)))
