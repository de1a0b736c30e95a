"""facto::quantize_map / facto::dequantize_map — a fixed-rate store of a feature map: b bits per
element, stochastically rounded within groups (ActNN, Chen et al. 2021; GACT, Liu et al. 2022), and
the ops whose backward keeps it: facto::quantized_conv2d (its weight gradient from the stored x) and
facto::quantized_mul (a product of two maps, each gradient from the other's stored form).

Format (`QuantizedMap`):

- Samples. A tensor of two or more dims has shape[0] samples of S = prod(shape[1:]) elements each
  (a 0-d or 1-d tensor is one sample). Each sample's elements are taken in the map's memory order:
  (H, W, C) for a channels_last map (no copy), the logical order for a contiguous tensor, and the
  logical order of a copy for any other.
- Groups. A sample is cut into ceil(S / G) groups of G consecutive elements (G = `group`, a multiple
  of 8 from 8 to 4096, 256 by default); its last group may be short, no group spans two samples.
  Each group keeps its minimum and scale = (max − min) · (1 / (2^b − 1)), both fp32 (float64 for a
  float64 map): 8 bytes per group, 0.25 bits per element at G = 256. fp16 statistics would save half
  of that, but an fp16 minimum of an fp32 map is rounded, so elements fall below it and are clamped
  (a bias), and the scale of a map of small range falls into fp16's subnormals; not used.
- Codes. With t = (x − min) / scale (0 for a constant group, scale 0) and u ~ U[0, 1), the code is
  q = clamp(floor(t) + [u < t − floor(t)], 0, 2^b − 1): floor(t + u) without the rounding of
  t + u (t − floor(t) is exact), so E[q] = t, E[min + q · scale] = x and |min + q · scale − x| <
  scale: every element is decoded within one step of its group, unbiased. A value on a level (an
  integer t) is coded exactly, whatever u. b ∈ {2, 4, 8}. The codes are packed b bits each, 8 / b
  per byte, least significant first (ops/bitpack.py's format), in memory order; each sample's codes
  start on a byte: ceil(S · b / 8) bytes per sample. (Where S is a multiple of 8 / b, as in nearly
  every CNN map, that is exactly ops/bitpack.pack_bits of the whole map in memory order; the padding
  otherwise keeps two of the Triton kernel's programs from writing into one byte.)
- Sizes depend only on the shape, bits and group: no host sync, no data-dependent shape.
- Non-finite elements make their group's statistics non-finite; that group decodes to NaN / inf.

Decoding gives fp32 (float64) values min + q · scale, rounded once to the map's dtype: unbiased up
to that rounding (half an ulp of a 16-bit dtype).

Randomness. Each call takes `seed`, an int64 tensor of one element (0-d) on the map's device. The
wrappers draw it with `draw_seed`: torch.randint on the map's device from torch's default generator,
so results follow torch.manual_seed, and no host sync: on CUDA the seed stays on the device, and
the Triton kernel loads it and draws u = tl.rand(seed, index) (Philox 4x32-10 keyed by the 64-bit
seed; the counter is the element's index in the map's memory order, mod 2^32). The PyTorch path
reads the seed on the host (a sync on CUDA: it is the reference path there) and dithers each group
by a Weyl sequence: element j of a group takes u = frac(s + j·φ), φ the golden ratio's fraction,
s ~ U[0, 1) one torch.rand draw per group from a torch.Generator seeded with the seed. For every
element u is then exactly uniform, so the codes are unbiased as with independent draws, and a
group's elements are spread evenly over [0, 1), so their rounding errors partly cancel; it draws
one number per group where torch.rand per element cost ten to thirty elementwise ops' time on a
CPU. The two paths' noise differs; each is uniform, so each is unbiased. The same seed gives the
same codes on one path and device.

The ops run the PyTorch path on the CPU and on fake tensors (their fake kernels), the Triton kernels
of facto_fx.triton_ops.quantized on CUDA (facto_fx.triton_ops.dispatch.use_triton).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from facto_fx.ops.bitpack import in_code_order, pack_bits, unpack_bits
from facto_fx.ops.chunks import quarter_pieces, row_pieces
from facto_fx.ops.conv_input import conv2d_input
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast
from facto_fx.shapes import is_channels_last, pair
from facto_fx.triton_ops.dispatch import check_mode, current_mode, use_triton

QUANTIZED_BITS = (2, 4, 8)
DEFAULT_BITS = 4
DEFAULT_GROUP = 256
MAX_GROUP = 4096
SEED_HIGH = 1 << 62  # seeds are drawn from [0, 2^62)


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in QUANTIZED_BITS:
        raise ValueError(f"bits must be one of {QUANTIZED_BITS}; got {bits!r}")
    return int(bits)


def check_group(group: object) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or not 8 <= group <= MAX_GROUP or group % 8:
        raise ValueError(f"group must be a multiple of 8 from 8 to {MAX_GROUP}; got {group!r}")
    return group


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the groups' minimum and scale, and of the decoding arithmetic."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def draw_seed(device: torch.device | str) -> Tensor:
    """A 0-d int64 seed on `device`, drawn from torch's default generator there (no host sync)."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)


class Layout(NamedTuple):
    """The static layout of a quantized map (SymInts under dynamic shapes)."""

    samples: int
    sample_size: int
    groups_per_sample: int
    bytes_per_sample: int

    @property
    def groups(self) -> int:
        return self.samples * self.groups_per_sample

    @property
    def nbytes(self) -> int:
        return self.samples * self.bytes_per_sample


def layout(shape: Sequence[int], bits: int, group: int) -> Layout:
    """Samples, elements per sample, groups per sample and code bytes per sample of a map of `shape`."""
    shape = tuple(shape)
    if len(shape) >= 2:
        samples, sample_size = shape[0], math.prod(shape[1:])
    else:
        samples, sample_size = 1, math.prod(shape)
    return Layout(samples, sample_size, -(-sample_size // group), -(-sample_size * bits // 8))


def quantized_nbytes(shape: Sequence[int], bits: int, group: int = DEFAULT_GROUP) -> int:
    """Bytes a map of `shape` takes quantized: codes + fp32 mins + fp32 scales."""
    lay = layout(shape, check_bits(bits), check_group(group))
    return lay.nbytes + 8 * lay.groups


def memory_order(x: Tensor) -> Tensor:
    """x's elements as a 1-D tensor in memory order: a view for a contiguous or channels_last x."""
    return in_code_order(x, is_channels_last(x))


def from_memory_order(flat: Tensor, shape: Sequence[int], channels_last: bool) -> Tensor:
    """Inverse of `memory_order`: a view of the 1-D `flat` as a tensor of `shape` (channels_last if asked)."""
    if channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def _empty_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    stats = stats_dtype(x.dtype)
    return (x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=stats), x.new_empty(0, dtype=stats))


# -- quantize and dequantize: the Triton kernels or the PyTorch path ----------------------------------


def quantize_parts(x: Tensor, bits: int, group: int, seed: Tensor, stream: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, mins, scales) of x; the Triton kernel on CUDA, else the PyTorch path; on fake and meta
    tensors (a fake kernel, the analytic report) tensors of the right sizes. `stream` is added to the
    seed (two maps of one call)."""
    lay = layout(x.shape, bits, group)
    stats = stats_dtype(x.dtype)
    if is_fake(x) or x.is_meta:
        return (x.new_empty(lay.nbytes, dtype=torch.uint8), x.new_empty(lay.groups, dtype=stats),
                x.new_empty(lay.groups, dtype=stats))
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()  # either path reads a copy in logical order: the kernel's, with no host sync
    if use_triton(x):
        from facto_fx.triton_ops.quantized import quantize

        return quantize(x, seed, bits, group, lay.samples, lay.sample_size, stream)
    return quantize_reference(x, bits, group, seed, stream)


def quantize_reference(
    x: Tensor, bits: int, group: int, seed: Tensor | int, stream: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The PyTorch path: (codes, mins, scales); u from a torch.Generator seeded with seed + stream."""
    lay = layout(x.shape, bits, group)
    stats = stats_dtype(x.dtype)
    if x.numel() == 0:
        return _empty_parts(x)
    levels = (1 << bits) - 1
    rows = memory_order(x).view(lay.samples, lay.sample_size)
    padded = lay.groups_per_sample * group
    if padded != lay.sample_size:  # repeat each sample's last element: the last group's min and max stay
        wide = rows.new_empty(lay.samples, padded)  # (no torch.cat: autocast's cat rejects fp16 under bf16)
        wide[:, : lay.sample_size] = rows
        wide[:, lay.sample_size:] = rows[:, -1:]
        rows = wide
    tiles = rows.view(lay.groups, group)
    lo, hi = tiles.amin(-1).to(stats), tiles.amax(-1).to(stats)  # (aminmax: a ~8 ms floor on a busy CPU)
    scale = (hi - lo) * (1.0 / levels)
    step = torch.where(scale > 0, scale, 1.0)[:, None]  # a constant group: t = 0, code 0
    generator = torch.Generator(device=x.device).manual_seed(int(seed) + stream)
    shift = torch.rand((lay.groups, 1), generator=generator, device=x.device, dtype=stats)
    codes = _stochastic_codes(tiles, lo[:, None], step, shift, weyl_sequence(group, stats, x.device), levels)
    codes = codes.view(lay.samples, padded)
    per_byte = 8 // bits
    codes = codes[:, : lay.bytes_per_sample * per_byte]  # each sample's codes end on a byte (zero-padded)
    if lay.bytes_per_sample * per_byte > lay.sample_size:
        codes = codes.clone()
        codes[:, lay.sample_size:] = 0
    return pack_bits(codes.contiguous(), bits), lo.reshape(-1), scale.reshape(-1)


def _stochastic_codes(
    tiles: Tensor, lo: Tensor, step: Tensor, shift: Tensor, weyl: Tensor, levels: int
) -> Tensor:
    """uint8 codes floor(t) + [u < t − floor(t)], t = (x − lo) / step and u = frac(shift + weyl), one
    row a group, in cache-sized pieces (ops/chunks.py) with every intermediate in a reused buffer."""
    codes = torch.empty(tiles.shape, dtype=torch.uint8, device=tiles.device)
    pieces = list(row_pieces(tiles.shape[0], tiles.shape[1], tiles.device))
    piece_shape = (pieces[0].stop, tiles.shape[1])
    t, whole, u = (torch.empty(piece_shape, dtype=lo.dtype, device=tiles.device) for _ in range(3))
    for rows in pieces:
        n = rows.stop - rows.start
        t_, whole_, u_ = t[:n], whole[:n], u[:n]
        torch.sub(tiles[rows], lo[rows], out=t_).div_(step[rows])
        torch.floor(t_, out=whole_)
        t_.sub_(whole_)  # the fraction, exact
        torch.add(shift[rows], weyl, out=u_).frac_()
        whole_.add_(u_.lt_(t_)).clamp_(0, levels)
        codes[rows] = whole_
    return codes


def weyl_sequence(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """frac(j·φ) for j < length, φ = (√5 − 1) / 2: evenly spread points of [0, 1), computed in float64."""
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    return (torch.arange(length, dtype=torch.float64, device=device) * phi).frac_().to(dtype)


def dequantize_reference(
    codes: Tensor, mins: Tensor, scales: Tensor, bits: int, group: int, shape: Sequence[int],
    channels_last: bool, dtype: torch.dtype,
) -> Tensor:
    """The PyTorch path of decoding, min + q · scale in `shape` and layout; also the fake kernel, and
    what torch.compile traces of a backward that decodes (its tensors are fake then)."""
    lay = layout(shape, bits, group)
    if math.prod(shape) == 0:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=codes.device, memory_format=memory_format)
    padded = lay.groups_per_sample * group
    coded = lay.bytes_per_sample * (8 // bits)  # codes a sample holds, padding included
    codes = codes.view(lay.samples, lay.bytes_per_sample)
    mins = mins.view(lay.samples, lay.groups_per_sample, 1)
    scales = scales.view(lay.samples, lay.groups_per_sample, 1)
    values = torch.empty(lay.samples, padded, dtype=mins.dtype, device=codes.device)
    pieces = list(row_pieces(lay.samples, padded, codes.device))
    q = torch.zeros(pieces[0].stop, padded, dtype=mins.dtype, device=codes.device)  # in cache (ops/chunks.py)
    for rows in pieces:  # values = min + q · scale, a piece of samples at a time
        n = rows.stop - rows.start
        q[:n, : min(coded, padded)] = unpack_bits(codes[rows].reshape(-1), bits, n * coded).view(n, coded)[:, :padded]
        out = values[rows].view(n, lay.groups_per_sample, group)  # (not addcmul: its fused rounding differs)
        torch.mul(q[:n].view(n, lay.groups_per_sample, group), scales[rows], out=out).add_(mins[rows])
    values = values[:, : lay.sample_size].to(dtype).contiguous()
    return from_memory_order(values.view(-1), shape, channels_last)


def dequantize_parts(
    codes: Tensor, mins: Tensor, scales: Tensor, bits: int, group: int, shape: Sequence[int],
    channels_last: bool, dtype: torch.dtype, kernels: str | None = None,
) -> Tensor:
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and use_triton(scales, kernels):
        from facto_fx.triton_ops.quantized import dequantize

        lay = layout(shape, bits, group)
        return dequantize(codes, mins, scales, bits, group, list(shape), channels_last, dtype, lay.samples,
                          lay.sample_size)
    return dequantize_reference(codes, mins, scales, bits, group, shape, channels_last, dtype)


def decode(
    codes: Tensor, mins: Tensor, scales: Tensor, bits: int, group: int, shape: Sequence[int], channels_last: bool,
    dtype: torch.dtype, kernels: str,
) -> Tensor:
    """A backward's decoding: facto::dequantize_map with the forward's kernel choice (an argument,
    so a compiled backward keeps it too). As one op, torch.compile's partitioner keeps the packed
    codes for it; the decoder traced inline had it keep the unpacked codes instead (twice the bytes
    at 4 bits, 13-23 % more saved bytes on models)."""
    return torch.ops.facto.dequantize_map(codes, mins, scales, bits, group, list(shape), channels_last, dtype,
                                          kernels)


# -- the storage ops ----------------------------------------------------------------------------------


@torch.library.custom_op("facto::quantize_map", mutates_args=())
def quantize_map(x: Tensor, bits: int, group: int, seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes uint8, mins, scales) of x; see the module's docstring for the format."""
    return quantize_parts(x, check_bits(bits), check_group(group), seed)


quantize_map.register_fake(lambda x, bits, group, seed: quantize_parts(x, bits, group, seed))


@torch.library.custom_op("facto::dequantize_map", mutates_args=())
def dequantize_map(
    codes: Tensor, mins: Tensor, scales: Tensor, bits: int, group: int, shape: list[int], channels_last: bool,
    dtype: torch.dtype, kernels: str | None = None,
) -> Tensor:
    """The decoded map: `shape`, `dtype`, channels_last if the quantized map was; `kernels` a
    facto_fx.use_kernels mode, None for the current one."""
    return dequantize_parts(codes, mins, scales, check_bits(bits), check_group(group), shape, channels_last, dtype,
                            None if kernels is None else check_mode(kernels))


@dequantize_map.register_fake
def _(codes, mins, scales, bits, group, shape, channels_last, dtype, kernels=None):
    return dequantize_reference(codes, mins, scales, bits, group, shape, channels_last, dtype)


class QuantizedMap(NamedTuple):
    """A map in the quantized store: the three tensors of quantize_map and what decoding needs."""

    codes: Tensor
    mins: Tensor
    scales: Tensor
    bits: int
    group: int
    shape: tuple[int, ...]
    channels_last: bool
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.mins, self.scales))

    def decode(self) -> Tensor:
        return torch.ops.facto.dequantize_map(
            self.codes, self.mins, self.scales, self.bits, self.group, list(self.shape), self.channels_last,
            self.dtype,
        )


def quantize(
    x: Tensor, bits: int = DEFAULT_BITS, group: int = DEFAULT_GROUP, seed: Tensor | None = None
) -> QuantizedMap:
    """x in the quantized store (detached); `seed` defaults to `draw_seed(x.device)`."""
    x = x.detach()
    seed = draw_seed(x.device) if seed is None else seed
    codes, mins, scales = torch.ops.facto.quantize_map(x, bits, group, seed)
    return QuantizedMap(codes, mins, scales, bits, group, tuple(x.shape), is_channels_last(x), x.dtype)


# -- facto::quantized_conv2d --------------------------------------------------------------------------


@torch.library.custom_op("facto::quantized_conv2d", mutates_args=())
def quantized_conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bits: int,
    group: int,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _conv_forward(x, weight, bias, stride, padding, dilation, groups, check_bits(bits), check_group(group),
                         seed)


def _conv_forward(x, weight, bias, stride, padding, dilation, groups, bits, group, seed):
    """(F.conv2d(x, weight, bias), codes, mins, scales of x); on fake tensors, the fake kernel.

    The weight and bias are cast to x's dtype (bf16 under autocast, which casts x: ops/autocast.py),
    as autocast casts them for F.conv2d, so y is F.conv2d's, bit for bit.
    """
    dtype = x.dtype
    y = F.conv2d(x, cast(weight, dtype), None if bias is None else cast(bias, dtype), stride, padding, dilation,
                 groups)
    return (y, *quantize_parts(x, bits, group, seed))


quantized_conv2d_fwd.register_fake(_conv_forward)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, bits, group, _ = inputs
    ctx.save_for_backward(*output[1:], weight)
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    ctx.channels_last = is_channels_last(x)  # the order the codes were packed in
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.bits, ctx.group = bits, group
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(*output[1:])


def _conv_backward(ctx, grad_y, *_grad_codes):
    """grad_x and grad_bias exact (the input gradient by ops/conv_input.py, from the weight alone);
    grad_weight from x̂, decoded a piece of samples at a time and summed over the pieces.

    grad_x comes first, and x̂ is never whole: on the CPU the backward holds the gradient and one
    piece beside it, where aten's convolution_backward on the decoded map held three to four maps
    (the decoded map, grad_x and oneDNN's reordered copies).
    """
    codes, mins, scales, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    stride, padding, dilation, groups = ctx.conv_args
    w = cast(weight, grad_y.dtype)
    grad_x = conv2d_input(ctx.x_shape, w, grad_y, stride, padding, dilation, groups) if need_x else None
    grad_w = cast(_conv_weight_gradient(ctx, codes, mins, scales, grad_y, w), weight.dtype) if need_w else None
    grad_b = grad_y.sum((0, 2, 3)).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _conv_weight_gradient(ctx, codes: Tensor, mins: Tensor, scales: Tensor, grad_y: Tensor, w: Tensor) -> Tensor:
    """Σ over pieces of samples of aten's weight gradient from the piece's decoded x̂.

    A piece is a quarter of the map, or 2^20 elements if that is more (ops/chunks.quarter_pieces).
    On the CPU each piece runs in fp32 or wider (x̂ decoded straight to it, grad_y's piece cast):
    bf16 pieces summed were off by up to 6 % an element here. On other devices the one piece keeps
    grad_y's dtype (cuDNN accumulates in fp32 itself).
    """
    lay = layout(ctx.x_shape, ctx.bits, ctx.group)
    dtype = stats_dtype(ctx.x_dtype) if grad_y.device.type == "cpu" else grad_y.dtype
    if lay.samples * lay.sample_size == 0:  # an empty batch: nothing to sum
        return w.new_zeros(w.shape, dtype=stats_dtype(dtype))
    codes, mins, scales = (t.view(lay.samples, -1) for t in (codes, mins, scales))
    stride, padding, dilation, groups = ctx.conv_args
    total = None
    for rows in quarter_pieces(lay.samples, lay.sample_size, grad_y):
        shape = (rows.stop - rows.start, *ctx.x_shape[1:])
        x_hat = decode(codes[rows].reshape(-1), mins[rows].reshape(-1), scales[rows].reshape(-1), ctx.bits, ctx.group,
                       shape, ctx.channels_last, dtype, ctx.kernels)
        _, part, _ = torch.ops.aten.convolution_backward(
            grad_y[rows].to(dtype), x_hat, w.to(dtype), None, stride, padding, dilation, False, [0, 0], groups,
            [False, True, False])
        del x_hat
        total = part.to(stats_dtype(part.dtype)) if total is None else total.add_(part)
    return total


register_autograd(quantized_conv2d_fwd, _conv_backward, _conv_setup_context)


def quantized_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bits: int = DEFAULT_BITS,
    group: int = DEFAULT_GROUP,
) -> Tensor:
    """F.conv2d whose backward keeps x in `bits` bits per element (stochastically rounded, unbiased):
    grad_x and grad_bias exact, grad_weight from the decoded x. Without a gradient to compute,
    this is F.conv2d."""
    bits, group = check_bits(bits), check_group(group)
    needs_grad = records_gradient(x, weight, bias)
    if not needs_grad:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y, *_ = torch.ops.facto.quantized_conv2d(
        x, weight, bias, pair(stride), pair(padding), pair(dilation), groups, bits, group, draw_seed(x.device)
    )
    return y


# -- facto::quantized_mul -----------------------------------------------------------------------------


def kept_in_full(t: Tensor, group: int) -> bool:
    """Whether a factor is saved as it is: fewer than `group` elements per sample (an SE gate)."""
    return layout(t.shape, 8, group).sample_size < group


@torch.library.custom_op("facto::quantized_mul", mutates_args=())
def quantized_mul_fwd(
    a: Tensor, b: Tensor, bits: int, group: int, seed: Tensor, save_a: bool, save_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _mul_forward(a, b, check_bits(bits), check_group(group), seed, save_a, save_b)


def _mul_forward(a, b, bits, group, seed, save_a, save_b):
    """(a · b, a's codes, mins, scales, b's codes, mins, scales); on fake tensors, the fake kernel.

    A factor is quantized only when it is kept (save_a: a is needed, for b's gradient) and not kept
    in full (`kept_in_full`: setup_context saves the input itself then); otherwise its three
    tensors are empty. b's noise is drawn with seed + 1.
    """
    parts_a = quantize_parts(a, bits, group, seed) if save_a and not kept_in_full(a, group) else _empty_parts(a)
    parts_b = quantize_parts(b, bits, group, seed, 1) if save_b and not kept_in_full(b, group) else _empty_parts(b)
    return (a * b, *parts_a, *parts_b)


quantized_mul_fwd.register_fake(_mul_forward)


def _mul_setup_context(ctx, inputs, output):
    a, b, bits, group, _, save_a, save_b = inputs
    full_a = a if save_a and kept_in_full(a, group) else None
    full_b = b if save_b and kept_in_full(b, group) else None
    ctx.save_for_backward(*output[1:], full_a, full_b)
    ctx.saved = (save_a, save_b)
    ctx.shapes = (tuple(a.shape), tuple(b.shape))
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.channels_last = (is_channels_last(a), is_channels_last(b))
    ctx.bits, ctx.group = bits, group
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(*output[1:])


def _mul_backward(ctx, grad_y, *_grad_codes):
    """grad_a = sum_to(g · b̂, a's shape), grad_b = sum_to(g · â, b's shape), each cast to its factor's
    dtype, as dense autograd computes them from a and b."""
    *parts, full_a, full_b = ctx.saved_tensors
    grads = [None, None]
    for i, full in ((0, full_b), (1, full_a)):  # grad of factor i needs the other factor
        if not ctx.needs_input_grad[i]:
            continue
        other = 1 - i
        if not ctx.saved[other]:
            raise RuntimeError(f"facto::quantized_mul was told not to keep {'ab'[other]}, which the gradient of "
                               f"{'ab'[i]} needs: pass save_{'ab'[other]}=True")
        if full is None:
            codes, mins, scales = parts[3 * other: 3 * other + 3]
            full = decode(codes, mins, scales, ctx.bits, ctx.group, ctx.shapes[other], ctx.channels_last[other],
                          ctx.dtypes[other], ctx.kernels)
        grads[i] = cast((grad_y * full).sum_to_size(ctx.shapes[i]), ctx.dtypes[i])
    return grads[0], grads[1], None, None, None, None, None


register_autograd(quantized_mul_fwd, _mul_backward, _mul_setup_context)


def quantized_mul(a: Tensor, b: Tensor, bits: int = DEFAULT_BITS, group: int = DEFAULT_GROUP) -> Tensor:
    """a · b (broadcasting) whose backward keeps each factor another's gradient needs in `bits` bits per
    element, or in full when it has fewer than `group` elements per sample (an SE gate). Without a
    gradient to compute, this is a · b."""
    bits, group = check_bits(bits), check_group(group)
    if not records_gradient(a, b):
        return a * b
    seed = draw_seed(a.device)
    return torch.ops.facto.quantized_mul(a, b, bits, group, seed, b.requires_grad, a.requires_grad)[0]
