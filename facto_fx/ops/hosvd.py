"""facto::hosvd_conv2d and facto::hosvd_linear: train the full weight, save a truncated (HO)SVD of the input.

The layer computes Y = W * X as usual and grad_X = conv2d_input(grad_Y, W), exactly. Only grad_W
needs X; instead of X the op saves a truncated decomposition of it, and grad_W is computed from the
decomposition without rebuilding X (paper: "Activation Map Compression through Tensor
Decomposition", shared/papers/hosvd-activation-compression.txt).

**Codes** (the op's second output, in this order; all but the last in x's dtype):

- conv, mode="hosvd": [core (K_B×K_C×K_H×K_W), U_B (B×K_B), U_C (C×K_C), U_H (H×K_H), U_W (W×K_W), s],
  X ≈ s · core ×_B U_B ×_C U_C ×_H U_H ×_W U_W.
- conv, mode="svd": [U_B (B×K_B), R (K_B×C×H×W, x's memory format), s], X_(B) ≈ s · U_B·R with s·R = U_Bᵀ·X_(B)
  the K_B×(C·H·W) right part S·Vᵀ, kept in the map's 4-D shape.
- linear (x of shape (..., in) taken as the rows × in matrix X): "hosvd" is 2 modes,
  [core (K_R×K_F), U_R, U_F, s]; "svd" the rows mode only, [U_R, R (K_R×in), s].
- s, the scale: a 0-d fp32 tensor (`SCALE_DTYPE`), a power of two, 1 unless the core (or R) would leave
  x's dtype's range (below).

**Ranks.** Each factor U_n holds the leading eigenvectors of the mode's Gram matrix
G_n = X_(n)·X_(n)ᵀ (I_n×I_n, torch.linalg.eigh in fp32, fp64 for fp64 inputs; a dual mode, below,
gets the same vectors from the smaller dual Gram); no SVD of an unfolding is formed. The rank K_n is
the smallest K with

    Σ_{i≤K} λ_i  ≥  ε · Σ_i λ_i,      λ_1 ≥ λ_2 ≥ ... the eigenvalues of G_n (= σ_i², σ the singular
                                       values of the unfolding X_(n)), clamped at 0.

**Dual modes.** A mode longer than the product P_n of the others (8×512×1×1: C = 512 > 8) has rank at
most P_n, and its I_n×I_n Gram at least I_n − P_n zero eigenvalues; fp32 eigh fails on such Grams
(raises, or returns NaN without raising, e.g. with one thread). Such a mode solves the dual Gram
X_(n)ᵀ·X_(n) (P_n×P_n, the same nonzero λ) instead: its eigenvectors V give U_n = X_(n)·V·Σ⁻¹, formed as
the QR factor of X_(n)·V, which is X_(n)·V·Σ⁻¹ with columns normalised where σ > 0, orthonormal columns
where σ = 0 or at rounding level (no division by σ), so K_n ≤ min(I_n, P_n). SVD's batch mode follows
the same rule (B > C·H·W: the C·H·W-sized dual).

**Range and fallback.** The Grams are formed from X divided by a power of two near max|X| (fp32
Grams of X itself would overflow above ~1e19 and keep no digits below ~1e-19), and the core (or R)
is scaled back; ranks and factors do not depend on the scale. The core concentrates X's energy (its
top entry is about ‖X‖_F, past fp16's 65504 on maps of modest entries: 8×64×16×16 of values up to
400), and R's entries reach σ_1. So the core (or R) is stored divided by s, the smallest power of two
≥ 1 that brings its Frobenius norm (a bound on each of its entries and on those of every partial
product formed from it) to at most the largest power of two of x's dtype: 2^15 for fp16, 2^127 for
bf16 and fp32. Other maps get s = 1, codes as if unscaled; s stays below 4·√numel(X), which fp32
holds for every input dtype. Its consumers (the weight gradients, `reconstruct`) multiply by s in
fp32 (fp64 for fp64). A mode whose fp32 eigh raises, or whose eigenvalues or factor columns
are not finite, is solved again in fp64, so finite input never gives non-finite codes.

The energy is thus the squared Frobenius norm (Σ_i λ_i = ‖X‖_F² for every mode), uncentered: no mean
is subtracted. The paper speaks of "the desired amount of information to retain (ε)" without a
formula; the authors' public code measures it as cumsum(σ²)/Σσ² of the raw unfolding, and σ² is the
right measure: projecting X on the K leading vectors of a mode leaves exactly
‖X − X ×_n U_n U_nᵀ‖_F² = (1 − kept)·‖X‖_F², and grad_W is linear in X, so ε bounds the squared
relative error of what grad_W sees along each mode. (Counting σ instead of σ² would keep more rank
than asked for, and its fraction has no such meaning.) ε = 1 is lossless up to rounding: the rank
stops only where the remaining eigenvalues add nothing to the floating-point sum. The core is that
of the plain truncated HOSVD: every factor comes from X itself, not from a partly projected core.

**Weight gradient.** HOSVD: grad_Y is contracted with U_B over the batch (K_B×O×H'×W'), the core is
expanded along H and W with U_H, U_W padded by zero rows for the conv's padding (each side apart,
so asymmetric and "same" padding are exact), the weight-gradient correlation
(aten.convolution_backward, weight only) runs on that K_B×K_C map, and U_C projects the result
back to channels; a grouped conv projects each group's output channels with that group's rows of
U_C. Where K_C exceeds a group's channel count (depthwise, most grouped convs) the core is expanded
with U_C first and the grouped correlation runs on the K_B×C map instead, the cheaper order there.
SVD: the same correlation on U_Bᵀ·grad_Y and the K_B rows R. Linear: grad_W = (U_Rᵀ·G)ᵀ·core·U_Fᵀ,
or (U_Rᵀ·G)ᵀ·R, G = grad_y as rows × out. Each runs in grad_Y's dtype on the codes as stored (s = 1:
exactly the unscaled arithmetic) and is then multiplied by s in fp32 (fp64 for fp64), which holds
the product where 16 bits may not, before the cast to the weight's dtype. The conv's grad_W is its own op,
facto::hosvd_conv2d_weight_grad: its work has the ranks in its shapes (a filter of K_C channels),
which the convolution meta kernel cannot trace with unbacked sizes, while its result has the
weight's static shape.

**Cost.** The forward copies X once, scaled (in fp32 for 16-bit inputs), forms one Gram matrix
per mode (at most min(B, C·H·W)², min(C, B·H·W)², ... entries; X is read once per mode) and runs eigh
on each, so the forward costs more than a plain conv's; the backward's weight-gradient correlation
runs on K_B (not B) samples of K_C (not C) channels.

**Host syncs** in a training forward: one `.tolist()` per op, of all the modes' ranks and of flags
saying whether their spectra are finite (the ranks are found on the device with cumsum /
searchsorted); a mode solved again in fp64 costs one more. On CUDA, torch.linalg.eigh also checks
the solver's status on the host, once per call; modes whose Grams have equal size (H = W, the usual
square map) share one batched call, so a square conv map costs at most 3 such checks for HOSVD, 1
for SVD. The backward has no host sync. Under torch.compile the fake kernel gives every rank an
unbacked size (`new_dynamic_size`, bounded by min(I_n, P_n)), so the graph traces with
data-dependent ranks; the fake is the op's own computation on fake tensors with those ranks.

**Autocast** (ops/autocast.py): like F.conv2d / F.linear, x is cast to the autocast dtype; the op
runs in x's dtype (weight and bias cast to it), so y and the codes (s aside) take x's dtype; grad_W and
grad_bias come back in the parameters' dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from facto_fx.ops.conv_input import conv2d_input
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast
from facto_fx.shapes import pair

MODES = ("hosvd", "svd")
SCALE_DTYPE = torch.float32  # the codes' last entry, s: a power of two in [1, 4·√numel(x)) (module docstring)
Spectrum = tuple[Tensor, Tensor]  # a mode's eigenvalues, descending; its factor's candidate columns in that order


class ModeRank(NamedTuple):
    """One mode of a decomposition: its dim in x, size I_n, rank K_n and energy fraction kept."""

    dim: int
    size: int
    rank: int
    kept: float


# ---------------------------------------------------------------------------------------------
# The decomposition (shared by the ops, their fakes and the public helpers)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the Gram matrices and eigh: fp32 at least, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_order(x: Tensor) -> list[int]:
    """x's dims from outermost to innermost in memory (stable for ties), so x.permute(order) is
    contiguous for contiguous, channels_last and permuted inputs alike."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


def _as_3d(t: Tensor, dim: int) -> tuple[int, int, int]:
    """(P, I, Q): the sizes before, at and after `dim` of a contiguous tensor."""
    return math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1:])


def _gram(t: Tensor, dim: int) -> Tensor:
    """X_(dim)·X_(dim)ᵀ of a contiguous tensor, without permuting it."""
    p, i, q = _as_3d(t, dim)
    if p == 1:
        m = t.view(i, q)
        return m @ m.T
    if q == 1:
        m = t.view(p, i)
        return m.T @ m
    v = t.view(p, i, q)
    return torch.einsum("piq,pjq->ij", v, v)


def _is_dual(t: Tensor, dim: int) -> bool:
    """Whether mode `dim` is longer than the product of the others: its rank is at most that product, so
    the dual Gram is the smaller one and has no forced zero eigenvalues (module docstring)."""
    p, i, q = _as_3d(t, dim)
    return i > p * q


def _dual_gram(t: Tensor, dim: int) -> Tensor:
    """X_(dim)ᵀ·X_(dim) of a contiguous tensor: the (P·Q)×(P·Q) Gram of the other modes' indices."""
    p, i, q = _as_3d(t, dim)
    v = t.view(p, i, q)
    return torch.einsum("aic,bid->acbd", v, v).reshape(p * q, p * q)


def _dual_factor(t: Tensor, dim: int, vectors: Tensor) -> Tensor:
    """U = X_(dim)·V·Σ⁻¹ for the dual Gram's eigenvectors V (descending), as the QR factor of X_(dim)·V: its
    columns normalised, and orthonormal where σ is 0 or at rounding level rather than divided by it."""
    p, i, q = _as_3d(t, dim)
    projected = torch.einsum("aic,acj->ij", t.view(p, i, q), vectors.view(p, q, -1))
    return torch.linalg.qr(projected).Q


def _mode_gram(t: Tensor, dim: int) -> Tensor:
    """The Gram whose eigenvectors give mode `dim`'s factor: X_(dim)·X_(dim)ᵀ, or the dual one."""
    return _dual_gram(t, dim) if _is_dual(t, dim) else _gram(t, dim)


def _mode_spectrum(t: Tensor, dim: int, values: Tensor, vectors: Tensor) -> Spectrum:
    """From eigh of _mode_gram: the eigenvalues descending, clamped at 0, and the factor's columns in that order."""
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(-1)
    return values, (_dual_factor(t, dim, vectors) if _is_dual(t, dim) else vectors)


def _spectrum_fp64(t: Tensor, dim: int) -> Spectrum:
    """Mode `dim`'s spectrum solved in fp64, in t's dtype: the fallback where fp32 eigh fails on a
    rank-deficient Gram (raises, or returns NaN without raising)."""
    t64 = t.to(torch.float64)
    values, vectors = _mode_spectrum(t64, dim, *torch.linalg.eigh(_mode_gram(t64, dim)))
    return values.to(t.dtype), vectors.to(t.dtype)


def _mode_product(t: Tensor, m: Tensor, dim: int) -> Tensor:
    """t ×_dim m: contracts dim of contiguous t (size I) with the columns of m (K×I); contiguous result."""
    p, i, q = _as_3d(t, dim)
    shape = (*t.shape[:dim], m.shape[0], *t.shape[dim + 1:])
    if guard_or_false(p == 1):  # (sizes may be unbacked ranks under torch.compile: no guard on them)
        return (m @ t.view(i, q)).view(shape)
    if guard_or_false(q == 1):
        return (t.view(p, i) @ m.T).view(shape)
    return torch.matmul(m, t.view(p, i, q)).view(shape)


def _spectra(t: Tensor, dims: list[int]) -> list[Spectrum]:
    """Per dim: its spectrum (_mode_spectrum).

    Grams of equal size share one batched eigh call (one solver status check on CUDA); a call whose
    solver gives up (it raises) is solved again in fp64, mode by mode.
    """
    grams = {d: _mode_gram(t, d) for d in dims}
    by_size: dict[object, list[int]] = {}
    for d in dims:
        size = grams[d].shape[0]
        by_size.setdefault(size if isinstance(size, int) else ("dim", d), []).append(d)
    out = {}
    for group in by_size.values():
        try:
            values, vectors = torch.linalg.eigh(torch.stack([grams[d] for d in group]))
        except torch.linalg.LinAlgError:
            out.update({d: _spectrum_fp64(t, d) for d in group})
            continue
        out.update({d: _mode_spectrum(t, d, values[j], vectors[j]) for j, d in enumerate(group)})
    return [out[d] for d in dims]


def _rank_and_kept(values: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """On the device: the smallest K with Σ_{i≤K} λ_i ≥ eps·Σλ (at least 1), and the fraction kept."""
    energy = values.cumsum(0)
    total = energy[-1:]
    k = torch.searchsorted(energy, total * eps).clamp(max=values.shape[0] - 1)
    kept = torch.where(total > 0, energy.gather(0, k) / total, torch.ones_like(total))
    return k + 1, kept


def _read(spectra: list[Spectrum], eps: float) -> list[list[float]]:
    """Per spectrum [rank, fraction kept, 1 if its values and columns are all finite else 0], one host sync."""
    rows = []
    for values, vectors in spectra:
        k, kept = _rank_and_kept(values, eps)
        finite = (torch.isfinite(values).all() & torch.isfinite(vectors).all()).view(1)
        rows.append(torch.cat([k.to(torch.float64), kept.to(torch.float64), finite.to(torch.float64)]))
    return torch.stack(rows).tolist()


def _measured(t: Tensor, dims: list[int], spectra: list[Spectrum], eps: float
              ) -> tuple[list[Spectrum], list[int], list[float]]:
    """The spectra, every mode's rank and the fraction it keeps, read with one host sync together with
    whether each spectrum is finite: a mode whose spectrum is not is solved again in fp64 and read again
    (one more sync, only then)."""
    read = _read(spectra, eps)
    bad = [j for j, (_, _, finite) in enumerate(read) if not finite]
    if bad:
        spectra = [_spectrum_fp64(t, d) if j in bad else s for j, (d, s) in enumerate(zip(dims, spectra, strict=True))]
        for j, row in zip(bad, _read([spectra[j] for j in bad], eps), strict=True):
            read[j] = row
    return spectra, [int(k) for k, _, _ in read], [kept for _, kept, _ in read]


def _measured_ranks(t: Tensor, dims: list[int], spectra: list[Spectrum], eps: float
                    ) -> tuple[list[Spectrum], list[int]]:
    """The op's ranks, measured (_measured); non-finite spectra come back solved in fp64."""
    spectra, ranks, _ = _measured(t, dims, spectra, eps)
    return spectra, ranks


def _unbacked_ranks(t: Tensor, dims: list[int], spectra: list[Spectrum], eps: float
                    ) -> tuple[list[Spectrum], list[int | torch.SymInt]]:
    """The fake kernel's ranks: data-dependent sizes in [1, min(I_n, P_n)], the factor's candidate columns
    (a mode with one column has rank 1); the spectra as they are (the fp64 fallback keeps their shapes)."""
    ranks = []
    for _, vectors in spectra:
        size = vectors.shape[1]
        if isinstance(size, int) and size == 1:
            ranks.append(1)
            continue
        k = torch.library.get_ctx().new_dynamic_size(min=1, max=size if isinstance(size, int) else None)
        torch._check(k <= size)
        ranks.append(k)
    return spectra, ranks


def _contraction_order(sizes: list, ranks: list) -> list[int]:
    """Contract first the modes that shrink most (known ranks); the given order for symbolic ones."""
    order = list(range(len(sizes)))
    if all(isinstance(v, int) for v in (*sizes, *ranks)):
        order.sort(key=lambda j: ranks[j] / sizes[j])
    return order


def _in_memory_order(x: Tensor, mode: str) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """A contiguous copy of x in its working dtype with its dims in memory order, divided by a power of two
    near max|x| (exact; the Grams square x's range, so fp32 would overflow above ~1e19 and keep no digits
    below ~1e-19; ranks and factors do not depend on the scale); that scale (1 for an all-zero x); the
    permutation back; and each decomposed mode's position there."""
    order = _memory_order(x)
    inverse = [order.index(d) for d in range(x.dim())]
    xp = x.permute(order).to(_work_dtype(x.dtype), memory_format=torch.contiguous_format, copy=True)
    top = torch.linalg.vector_norm(xp, float("inf"))
    scale = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top))), torch.ones_like(top))
    positions = [inverse[d] for d in (range(x.dim()) if mode == "hosvd" else [0])]
    return xp.div_(scale), scale, inverse, positions


def _in_storage_range(rest: Tensor, scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """rest·scale (the core or R of x, formed from x / scale) divided by s, and s: the smallest power of two
    ≥ 1 that keeps its Frobenius norm, which bounds every entry, within `dtype`'s largest power of two (an
    fp16 core's top entry is about ‖X‖_F: past 65504 on maps of modest entries). Exact: powers of two."""
    limit = math.floor(math.log2(torch.finfo(dtype).max))
    log_norm = torch.log2(scale) + torch.log2(torch.linalg.vector_norm(rest))  # -inf for a zero rest: s = 1
    s = torch.exp2(torch.ceil(log_norm - limit).clamp(min=0))
    return rest.mul_(scale / s), s.to(SCALE_DTYPE)


def _unscaled(t: Tensor, s: Tensor) -> Tensor:
    """t·s in t's working precision (fp32 at least): a product the codes' own 16-bit dtype may not hold."""
    work = _work_dtype(t.dtype)
    return cast(t, work) * cast(s, work)


def _decompose(x: Tensor, eps: float, mode: str, rank_fn) -> list[Tensor]:
    """The codes of x (see the module docstring), with ranks from `rank_fn` (measured, or unbacked)."""
    dtype = x.dtype
    xp, scale, inverse, positions = _in_memory_order(x, mode)
    spectra, ranks = rank_fn(xp, positions, _spectra(xp, positions), eps)
    factors = [vectors[:, :k] for (_, vectors), k in zip(spectra, ranks, strict=True)]
    rest = xp
    sizes = [xp.shape[p] for p in positions]
    for j in _contraction_order(sizes, ranks):
        rest = _mode_product(rest, factors[j].T, positions[j])
    rest, s = _in_storage_range(rest, scale, dtype)  # rest is a new tensor: every mode product makes one
    stored = [f.to(dtype).clone(memory_format=torch.contiguous_format) for f in factors]
    if mode == "hosvd":
        core = rest.permute(inverse).contiguous().to(dtype)
        return [core, *stored, s]
    return [*stored, rest.permute(inverse).to(dtype), s]  # R keeps x's memory order (channels_last: channels_last)


def _check(eps: float, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps (the fraction of each mode's energy kept) must be in (0, 1]; got {eps!r}")


def decompose(x: Tensor, eps: float = 0.8, mode: str = "hosvd") -> list[Tensor]:
    """The codes the ops save for x: all modes of x (mode="hosvd") or its dim-0 unfolding ("svd").

    A conv layer decomposes its 4-D input as is; a linear layer decomposes x.reshape(-1, in).
    """
    _check(eps, mode)
    if x.dim() < 2:
        raise ValueError(f"decompose needs a tensor of 2 or more dims; got shape {tuple(x.shape)}")
    with torch.no_grad():
        return _decompose(x.detach(), float(eps), mode, _measured_ranks)


def reconstruct(codes: list[Tensor]) -> Tensor:
    """X̂ in x's dtype from `decompose`'s (or an op's) codes: s·U·R for SVD codes, s·core ×_n U_n for HOSVD
    codes, formed in the working precision (fp32 at least: 16-bit s·core may not be representable)."""
    *parts, s = codes
    dtype = parts[0].dtype
    parts = [cast(p, _work_dtype(dtype)) for p in parts]
    if len(parts) == 2:
        u, r = parts
        out = (u @ r.reshape(r.shape[0], -1)).view(u.shape[0], *r.shape[1:])
    else:
        core, *factors = parts
        out = core.contiguous()
        for d, u in enumerate(factors):
            out = _mode_product(out, u, d)
    return _unscaled(out, s).to(dtype)


def rank_report(x: Tensor, eps: float = 0.8, mode: str = "hosvd") -> list[ModeRank]:
    """Per decomposed mode of x: its rank and the fraction of its energy kept (one host sync)."""
    _check(eps, mode)
    if x.dim() < 2:
        raise ValueError(f"rank_report needs a tensor of 2 or more dims; got shape {tuple(x.shape)}")
    with torch.no_grad():
        xp, _, _, positions = _in_memory_order(x.detach(), mode)
        _, ranks, kept = _measured(xp, positions, _spectra(xp, positions), float(eps))
    dims = range(x.dim()) if mode == "hosvd" else [0]
    return [ModeRank(d, x.shape[d], ranks[j], kept[j]) for j, d in enumerate(dims)]


# ---------------------------------------------------------------------------------------------
# Convolution


def conv_padding(
    padding: int | tuple[int, ...] | list[int] | str,
    kernel_size: tuple[int, int],
    stride: list[int],
    dilation: list[int],
) -> list[int]:
    """Any conv2d padding as (left, right, top, bottom), F.pad's order.

    An int pads all sides, (ph, pw) pads top/bottom by ph and left/right by pw, a 4-tuple is taken
    as (left, right, top, bottom), "valid" is no padding and "same" is PyTorch's: dilation·(k − 1)
    in all, the odd one on the right / bottom (stride 1 only, as in F.conv2d).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise ValueError(f"padding string must be 'same' or 'valid'; got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total_h, total_w = (d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True))
        return [total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2]
    sides = [padding] * 4 if isinstance(padding, int) else list(padding)
    if len(sides) == 2:
        sides = [sides[1], sides[1], sides[0], sides[0]]
    if len(sides) != 4 or any(not isinstance(p, int) or p < 0 for p in sides):
        raise ValueError(
            f"padding must be 'same', 'valid', or a non-negative int, (ph, pw) or (left, right, top, bottom); "
            f"got {padding!r}"
        )
    return sides


def _symmetric(pads: list[int]) -> bool:
    left, right, top, bottom = pads
    return left == right and top == bottom


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, pads, dilation, groups) -> Tensor:
    if _symmetric(pads):
        return F.conv2d(x, weight, bias, stride, (pads[2], pads[0]), dilation, groups)
    return F.conv2d(F.pad(x, pads), weight, bias, stride, 0, dilation, groups)


@torch.library.custom_op("facto::hosvd_conv2d", mutates_args=())
def hosvd_conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    mode: str,
) -> tuple[Tensor, list[Tensor]]:
    return _conv_forward(x, weight, bias, stride, padding, dilation, groups, eps, mode, _measured_ranks)


def _conv_forward(x, weight, bias, stride, padding, dilation, groups, eps, mode, rank_fn):
    """The op's computation (padding is (left, right, top, bottom)); runs in x's dtype."""
    bias = None if bias is None else cast(bias, x.dtype)
    y = _conv(x, cast(weight, x.dtype), bias, stride, padding, dilation, groups)
    return y, _decompose(x, eps, mode, rank_fn)


@hosvd_conv2d_fwd.register_fake
def _conv_fake(x, weight, bias, stride, padding, dilation, groups, eps, mode):
    """The same computation on fake tensors, with unbacked ranks."""
    return _conv_forward(x, weight, bias, stride, padding, dilation, groups, eps, mode, _unbacked_ranks)


def _conv_input_grad(grad_y: Tensor, x_shape, weight: Tensor, stride, pads, dilation, groups) -> Tensor:
    """grad_X = conv2d_input(grad_Y, W), exact; asymmetric padding: that of the padded input, cropped."""
    w = cast(weight, grad_y.dtype)
    if _symmetric(pads):
        return conv2d_input(x_shape, w, grad_y, stride, (pads[2], pads[0]), dilation, groups)
    left, right, top, bottom = pads
    b, c, h, wd = x_shape
    padded = (b, c, h + top + bottom, wd + left + right)
    grad = conv2d_input(padded, w, grad_y, stride, 0, dilation, groups)
    return grad[:, :, top:top + h, left:left + wd]


def _batch_contracted(grad_y: Tensor, u_b: Tensor) -> Tensor:
    """Σ_b U_B[b, i]·grad_Y[b]: grad_Y in the batch factor's K_B space."""
    return (u_b.T @ grad_y.reshape(grad_y.shape[0], -1)).view(u_b.shape[1], *grad_y.shape[1:])


def _hosvd_weight_grad(grad_y: Tensor, codes, weight_shape, stride, pads, dilation, groups) -> Tensor:
    """grad_W from the core and factors, never rebuilding X (module docstring)."""
    core, u_b, u_c, u_h, u_w = (cast(c, grad_y.dtype) for c in codes)
    left, right, top, bottom = pads
    g_b = _batch_contracted(grad_y, u_b)  # K_B × O × H' × W'
    u_h = F.pad(u_h, (0, 0, top, bottom))  # zero rows: the conv's padding, each side apart
    u_w = F.pad(u_w, (0, 0, left, right))
    z = torch.matmul(u_h, torch.matmul(core, u_w.T))  # K_B × K_C × Hp × Wp: the padded X in K_B × K_C space
    out_channels, group_channels, kh, kw = weight_shape
    k_c = u_c.shape[1]
    if k_c <= group_channels:
        # correlation in K_C space, then each group's output channels projected by its rows of U_C
        g = torch.nn.grad.conv2d_weight(z, (out_channels, k_c, kh, kw), g_b, stride, 0, dilation, 1)
        g = g.reshape(groups, out_channels // groups, k_c, kh * kw)
        grad = torch.matmul(u_c.view(groups, 1, group_channels, k_c), g)
        return grad.view(weight_shape)
    # K_C above a group's channels (depthwise): expand the channels first, then the grouped correlation
    zc = torch.matmul(u_c, z.reshape(z.shape[0], k_c, -1)).view(z.shape[0], u_c.shape[0], *z.shape[2:])
    return torch.nn.grad.conv2d_weight(zc, weight_shape, g_b, stride, 0, dilation, groups)


def _svd_weight_grad(grad_y: Tensor, codes, weight_shape, stride, pads, dilation, groups) -> Tensor:
    """grad_W as the weight-gradient correlation of U_Bᵀ·grad_Y with the K_B rows R."""
    u_b, r = (cast(c, grad_y.dtype) for c in codes)
    g_b = _batch_contracted(grad_y, u_b)
    if _symmetric(pads):
        return torch.nn.grad.conv2d_weight(r, weight_shape, g_b, stride, (pads[2], pads[0]), dilation, groups)
    return torch.nn.grad.conv2d_weight(F.pad(r, pads), weight_shape, g_b, stride, 0, dilation, groups)


@torch.library.custom_op("facto::hosvd_conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(
    grad_y: Tensor,
    codes: list[Tensor],
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
) -> Tensor:
    """grad_W (contiguous, in grad_y's working precision: fp32, fp64 for fp64) from the saved codes: the
    backward's one opaque step. It runs in grad_y's dtype on the codes as stored, then multiplies by s.

    An op of its own because its work has the data-dependent ranks in its shapes (the correlation
    in K_C space has a filter of K_C channels), which torch.compile's convolution meta cannot trace
    with unbacked sizes; its result has the weight's static shape, which the fake gives alone.
    """
    weight_grad = _hosvd_weight_grad if mode == "hosvd" else _svd_weight_grad
    *parts, s = codes
    return _unscaled(weight_grad(grad_y, parts, weight_shape, stride, padding, dilation, groups), s).contiguous()


@conv2d_weight_grad.register_fake
def _conv2d_weight_grad_fake(grad_y, codes, weight_shape, stride, padding, dilation, groups, mode):
    return grad_y.new_empty(weight_shape, dtype=_work_dtype(grad_y.dtype))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, _, mode = inputs
    codes = output[1]
    ctx.save_for_backward(weight, *codes)
    ctx.mark_non_differentiable(*codes)
    ctx.x_shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.mode = mode


def _conv_backward(ctx, grad_y, _grad_codes):
    weight, *codes = ctx.saved_tensors
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _conv_input_grad(grad_y, ctx.x_shape, weight, *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.facto.hosvd_conv2d_weight_grad(grad_y, codes, list(weight.shape), *ctx.conv_args, ctx.mode)
        grad_w = cast(grad_w, weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = cast(grad_y.sum((0, 2, 3)), ctx.bias_dtype)
    return grad_x, grad_w, grad_bias, None, None, None, None, None, None


register_autograd(hosvd_conv2d_fwd, _conv_backward, _conv_setup_context)


def hosvd_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    eps: float = 0.8,
    mode: str = "hosvd",
) -> Tensor:
    """conv2d that saves a truncated HOSVD (or batch-mode SVD) of x for grad_W; a plain conv when
    no gradient is needed. padding: int, (ph, pw), (left, right, top, bottom), "same" or "valid"."""
    _check(eps, mode)
    stride, dilation = pair(stride), pair(dilation)
    pads = conv_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    needs_grad = records_gradient(x, weight, bias)
    # Meta tensors (analytic reports) cannot hold data-dependent ranks: the plain conv gives the
    # shapes, and the report takes the codes' worst case from the method.
    if not needs_grad or x.is_meta:
        return _conv(x, cast(weight, x.dtype), None if bias is None else cast(bias, x.dtype), stride, pads, dilation,
                     groups)
    y, _ = torch.ops.facto.hosvd_conv2d(x, weight, bias, stride, pads, dilation, groups, float(eps), mode)
    return y


# ---------------------------------------------------------------------------------------------
# Linear


@torch.library.custom_op("facto::hosvd_linear", mutates_args=())
def hosvd_linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, mode: str
) -> tuple[Tensor, list[Tensor]]:
    return _linear_forward(x, weight, bias, eps, mode, _measured_ranks)


def _linear_forward(x, weight, bias, eps, mode, rank_fn):
    """y = x·Wᵀ + b in x's dtype; codes of the rows × in matrix x.reshape(-1, in)."""
    bias = None if bias is None else cast(bias, x.dtype)
    y = F.linear(x, cast(weight, x.dtype), bias)
    return y, _decompose(x.reshape(-1, x.shape[-1]), eps, mode, rank_fn)


@hosvd_linear_fwd.register_fake
def _linear_fake(x, weight, bias, eps, mode):
    return _linear_forward(x, weight, bias, eps, mode, _unbacked_ranks)


def _linear_setup_context(ctx, inputs, output):
    _, weight, bias, _, mode = inputs
    codes = output[1]
    ctx.save_for_backward(weight, *codes)
    ctx.mark_non_differentiable(*codes)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mode = mode


def _linear_backward(ctx, grad_y, _grad_codes):
    weight, *codes = ctx.saved_tensors
    grad_x = grad_w = grad_bias = None
    rows = grad_y.reshape(-1, grad_y.shape[-1])
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ cast(weight, grad_y.dtype)
    if ctx.needs_input_grad[1]:
        *parts, s = codes
        parts = [cast(c, grad_y.dtype) for c in parts]
        if ctx.mode == "hosvd":
            core, u_r, u_f = parts
            grad_w = ((u_r.T @ rows).T @ core) @ u_f.T
        else:
            u_r, r = parts
            grad_w = (u_r.T @ rows).T @ r
        grad_w = cast(_unscaled(grad_w, s), weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = cast(rows.sum(0), ctx.bias_dtype)
    return grad_x, grad_w, grad_bias, None, None


register_autograd(hosvd_linear_fwd, _linear_backward, _linear_setup_context)


def hosvd_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 0.8, mode: str = "hosvd"
) -> Tensor:
    """linear that saves a truncated decomposition of x's rows × in matrix for grad_W: 2-mode HOSVD
    or the rows-mode SVD; a plain linear when no gradient is needed."""
    _check(eps, mode)
    needs_grad = records_gradient(x, weight, bias)
    if not needs_grad or x.is_meta:  # meta: see hosvd_conv2d
        return F.linear(x, cast(weight, x.dtype), None if bias is None else cast(bias, x.dtype))
    y, _ = torch.ops.facto.hosvd_linear(x, weight, bias, float(eps), mode)
    return y
