"""Facto layers: the modules the pass swaps in for conv, linear and batch-norm.

Like peft's LoRA layers, each keeps the frozen base weight under its original name and exposes
`get_delta_weight`, `merge`, `redraw` and `to_dense` as plain methods; the hooks in
`facto_fx.passes.hooks` call them on a schedule.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from facto_fx import ops
from facto_fx.shapes import pair


def direction_seed(base_seed: int, draws: int) -> int:
    """A distinct, reproducible seed for every (layer, redraw) pair.

    Hashed, because torch.Generator's Mersenne Twister keeps only the low 32 bits of a seed.
    """
    digest = hashlib.blake2b(f"{base_seed}/{draws}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def direction_norm(rank: int, features: int, scale: str) -> float:
    """α, the norm of D's rows: (I/R)^(1/4) for scale "paper" (eq. 13), (I/R)^(1/2) for "unbiased".

    An SGD step on M moves Ω by −η·g·DᵀD, and E[DᵀD] = α²·R/I. The paper's α makes that
    sqrt(R/I)·I: for a 3×3 conv at INR 0.3 (R/I = 1/30) the step descends at 18 % of full-rank
    SGD's rate, and on a task that was not saturated Facto's layers learned less than not
    training them at all (benchmarks/accuracy.py). "unbiased" makes E[DᵀD] = I: the step is an
    unbiased estimate of full-rank SGD's.
    """
    return (features / rank) ** (0.25 if scale == "paper" else 0.5)


def draw_direction(rank: int, features: int, seed: int, dtype: torch.dtype, device: torch.device,
                   orthonormal: bool = False, scale: str = "unbiased") -> Tensor:
    """D (rank × features): Gaussian rows of norm α (`direction_norm`; paper eq. 13 for "paper").

    orthonormal=True makes the rows mutually orthogonal as well (the Q of a Gaussian matrix's QR),
    with the same norm α. Then DᵀD = α²·P, P the projection on D's row space, so an SGD step on M
    moves Ω by −η·α²·g·P: plain SGD on Ω restricted to R random directions; at R = features it is
    exactly SGD. Gaussian rows instead give g·DᵀD, a random, badly conditioned preconditioner.

    Drawn on the CPU with its own generator so every device and every process gets the same D.
    On the meta device (analytic memory reports) nothing is drawn.
    """
    if torch.device(device).type == "meta":
        return torch.empty(rank, features, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(rank, features, generator=generator, dtype=torch.float64 if orthonormal else torch.float32)
    if orthonormal:
        q, r = torch.linalg.qr(d.T)  # features × rank, orthonormal columns
        d = (q * torch.sign(torch.diagonal(r))).T.float()  # the sign fix makes Q unique: same seed, same D
    d *= direction_norm(rank, features, scale) / d.norm(dim=1, keepdim=True)
    return d.to(dtype=dtype, device=device)


def gradient_direction(gradient: Tensor, rank: int, seed: int) -> Tensor:
    """D (rank × features) from a weight gradient (out × features): its top `rank` right singular
    vectors, as orthonormal rows (α = 1, so an SGD step on M is the SGD step on Ω projected on
    them, as GaLore projects). Where the gradient has fewer than `rank` directions (a layer with
    fewer outputs than the rank), seeded Gaussian directions orthogonal to them fill the rest.

    Computed in float64 on the CPU: the same gradient gives the same D on every device and process.
    """
    g = gradient.detach().to("cpu", torch.float64)
    _, sigma, vh = torch.linalg.svd(g, full_matrices=False)
    kept = vh[: min(rank, int((sigma > sigma.max() * 1e-10).sum()) if sigma.numel() else 0)]
    if kept.shape[0] < rank:
        filler = torch.randn(rank - kept.shape[0], g.shape[1], generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
        q, r = torch.linalg.qr(torch.cat([kept, filler]).T)
        kept = (q * torch.sign(torch.diagonal(r))).T
    return kept


class LowRankMixin:
    """Shared state of a frozen weight W re-parameterised as W + M·D."""

    weight: nn.Parameter
    M: nn.Parameter
    D: Tensor
    draws: Tensor
    seed: int

    def _init_low_rank(self, weight: nn.Parameter, rank: int, features: int, seed: int, direction: str,
                       scale: str) -> None:
        """M = 0 and a first D for `self.weight`, which the caller has set. `direction` is how D is
        drawn ("gaussian", "orthonormal") or, for "gradient", taken from a weight gradient at each
        merge (drawn orthonormal until the first); `scale` sets a drawn D's norm (`direction_norm`)."""
        self.seed, self.direction, self.scale = seed, direction, scale
        orthonormal = self.orthonormal
        self.M = nn.Parameter(weight.new_zeros(weight.shape[0], rank))
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.register_buffer("D", draw_direction(rank, features, direction_seed(seed, 0), weight.dtype, weight.device,
                                                 orthonormal, scale))

    @property
    def rank(self) -> int:
        return self.M.shape[1]

    @property
    def orthonormal(self) -> bool:
        return self.direction != "gaussian"

    def get_delta_weight(self) -> Tensor:
        """ΔW = reshape(M·D), shaped like the base weight."""
        return ops.delta_weight(self.weight, self.M, self.D)

    def merged_weight(self) -> Tensor:
        """Ω = W + ΔW: the weight the layer computes with."""
        return ops.merged_weight(self.weight, self.M, self.D)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW and M ← 0: the output is unchanged, the low-rank part starts afresh."""
        self.weight.add_(self.get_delta_weight())
        self.M.zero_()

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw a new direction matrix D (call after `merge`, while M is 0)."""
        self.draws += 1
        fresh = draw_direction(
            self.rank, self.D.shape[1], direction_seed(self.seed, int(self.draws)), self.D.dtype, self.D.device,
            self.orthonormal, self.scale,
        )
        self.set_direction(fresh)

    @torch.no_grad()
    def redraw_from_gradient(self, gradient: Tensor) -> None:
        """D from a weight gradient of this layer (`gradient_direction`; call after `merge`, while M is 0)."""
        self.draws += 1
        fresh = gradient_direction(gradient.flatten(1), self.rank, direction_seed(self.seed, int(self.draws)))
        self.set_direction(fresh)

    @torch.no_grad()
    def set_direction(self, d: Tensor) -> None:
        """D ← d (rank × features), and whatever the layer derives from D."""
        self.D.copy_(d)

    @torch.no_grad()
    def regularize(self, strength: float) -> None:
        """W ← W − λ·Ω (paper eq. 14): weight decay on the full weight the layer uses."""
        self.weight.sub_(strength * self.merged_weight())


class FactoConv2d(LowRankMixin, nn.Module):
    """A Conv2d trained as W + reshape(M·D), saving a pooled, channel-projected input."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        dilation: int | tuple[int, int],
        rank: int,
        lossy_kernel: int,
        storage_dtype: torch.dtype | None,
        seed: int,
        *,
        direction: str = "gaussian",
        scale: str = "unbiased",
    ) -> None:
        super().__init__()
        self.out_channels, self.in_channels = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = tuple(pair(stride)), tuple(pair(padding)), tuple(pair(dilation))
        self.lossy_kernel, self.storage_dtype = lossy_kernel, storage_dtype
        self.weight = weight.requires_grad_(False)
        self._init_low_rank(weight, rank, weight[0].numel(), seed, direction, scale)
        self.bias = bias
        self.register_buffer("folded", None, persistent=False)
        self._refresh_folded()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_folded())

    @torch.no_grad()
    def _refresh_folded(self) -> None:
        """Z_p's pool-folded projection filter: a function of D, formed once per draw."""
        self.folded = ops.projection_filter(self.D, self.weight.shape, self.stride, self.dilation, self.lossy_kernel)

    @torch.no_grad()
    def set_direction(self, d: Tensor) -> None:
        super().set_direction(d)
        self._refresh_folded()

    def weight_gradient(self, x: Tensor, grad_y: Tensor) -> Tensor:
        """∂loss/∂Ω from the layer's input and output gradient (the dense conv's weight gradient)."""
        return torch.nn.grad.conv2d_weight(x, self.weight.shape, grad_y, self.stride, self.padding, self.dilation)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, lossy_kernel: int, storage_dtype: torch.dtype | None, seed: int, *,
        direction: str = "gaussian", scale: str = "unbiased",
    ) -> FactoConv2d:
        """The Facto layer for an nn.Conv2d, sharing its weight and bias."""
        return cls(
            conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, rank, lossy_kernel, storage_dtype, seed,
            direction=direction, scale=scale,
        )

    functional = staticmethod(ops.conv2d)

    def arguments(self) -> tuple:
        """Everything `functional` takes after x: graphs without modules call it with these."""
        return (
            self.weight, self.M, self.D, self.bias,
            self.stride, self.padding, self.dilation, self.lossy_kernel, self.storage_dtype, self.folded,
        )

    def forward(self, x: Tensor) -> Tensor:
        return ops.conv2d(x, *self.arguments())

    def forward_padded(self, x: Tensor, padding: tuple[int, int]) -> Tensor:
        """forward with `padding` in place of the layer's own: row strips pad the height at the
        map's own edges themselves and run the layer on exactly the rows they need."""
        return ops.conv2d(x, self.weight, self.M, self.D, self.bias, self.stride, padding, self.dilation,
                          self.lossy_kernel, self.storage_dtype, self.folded)

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.merged_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, rank={self.rank}, lossy_kernel={self.lossy_kernel}"
        )


class FactoLinear(LowRankMixin, nn.Module):
    """A Linear trained as W + M·D, saving D·x instead of x."""

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, rank: int, storage_dtype: torch.dtype | None, seed: int,
        *, direction: str = "gaussian", scale: str = "unbiased",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.storage_dtype = storage_dtype
        self.weight = weight.requires_grad_(False)
        self._init_low_rank(weight, rank, self.in_features, seed, direction, scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, storage_dtype: torch.dtype | None, seed: int, *,
                    direction: str = "gaussian", scale: str = "unbiased") -> FactoLinear:
        """The Facto layer for an nn.Linear, sharing its weight and bias."""
        return cls(linear.weight, linear.bias, rank, storage_dtype, seed, direction=direction, scale=scale)

    functional = staticmethod(ops.linear)

    def arguments(self) -> tuple:
        """Everything `functional` takes after x: graphs without modules call it with these."""
        return self.weight, self.M, self.D, self.bias, self.storage_dtype

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, *self.arguments())

    def weight_gradient(self, x: Tensor, grad_y: Tensor) -> Tensor:
        """∂loss/∂Ω from the layer's input and output gradient."""
        return grad_y.flatten(0, -2).T @ x.flatten(0, -2)

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FactoBatchNorm(nn.Module):
    """Batch-norm whose saved input is x̂ mean-pooled (in `bits`-bit codes, given them); γ and β
    stay trainable.

    With frozen statistics it is a per-channel affine in every mode. With `batch_statistics` it
    trains as torch's batch-norm does (batch statistics, running statistics updated with the
    module's momentum) and evaluates on the running statistics. It shares parameters and buffers
    with the module it replaces, so the statistics stay where the original model (and
    `export_dense`) expects them.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, lossy_kernel: int, storage_dtype: torch.dtype | None,
                 batch_statistics: bool = False, bits: int | None = None):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.lossy_kernel, self.storage_dtype, self.bits = lossy_kernel, storage_dtype, bits
        self.batch_statistics = batch_statistics
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        training, momentum = self.batch_statistics and self.training, 0.0
        if training:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return ops.batch_norm_in_mode(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training, momentum, self.eps, self.lossy_kernel, self.storage_dtype, self.bits,
        )

    def extra_repr(self) -> str:
        statistics = "batch statistics" if self.batch_statistics else "frozen statistics"
        codes = "" if self.bits is None else f", bits={self.bits}"
        return f"{self.num_features}, eps={self.eps}, {statistics}, lossy_kernel={self.lossy_kernel}{codes}"


class FactoDropout(nn.Module):
    """Dropout that saves a bit-packed mask; follows `self.training` like nn.Dropout."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


LOW_RANK_LAYERS = (FactoConv2d, FactoLinear)


class HOSVDConv2d(nn.Module):
    """A Conv2d that trains its own weight and saves a truncated HOSVD / SVD of its input for grad_W."""

    functional = staticmethod(ops.hosvd_conv2d)

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        stride: int | tuple[int, int],
        padding: int | tuple[int, ...] | str,
        dilation: int | tuple[int, int],
        groups: int,
        eps: float,
        mode: str,
    ) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.stride, self.dilation = tuple(pair(stride)), tuple(pair(dilation))
        # int, (ph, pw), (left, right, top, bottom) or "same" / "valid", as ops.conv_padding reads it
        self.padding = padding if isinstance(padding, str) else tuple(pair(padding)) if isinstance(padding, int) else (
            tuple(padding)
        )
        self.groups, self.eps, self.mode = groups, eps, mode

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, eps: float, mode: str) -> HOSVDConv2d:
        """The layer for an nn.Conv2d, sharing its weight and bias."""
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, eps, mode)

    def arguments(self) -> tuple:
        """Everything `functional` takes after x: graphs without modules call it with these."""
        return self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.eps, self.mode

    def forward(self, x: Tensor) -> Tensor:
        return ops.hosvd_conv2d(x, *self.arguments())

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, {self.mode}, eps={self.eps}"


class HOSVDLinear(nn.Module):
    """A Linear that trains its own weight and saves a truncated decomposition of its input rows."""

    functional = staticmethod(ops.hosvd_linear)

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float, mode: str) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.mode = weight, bias, eps, mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, eps: float, mode: str) -> HOSVDLinear:
        return cls(linear.weight, linear.bias, eps, mode)

    def arguments(self) -> tuple:
        """Everything `functional` takes after x: graphs without modules call it with these."""
        return self.weight, self.bias, self.eps, self.mode

    def forward(self, x: Tensor) -> Tensor:
        return ops.hosvd_linear(x, *self.arguments())

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, {self.mode}, eps={self.eps}"


class QuantizedConv2d(nn.Module):
    """A Conv2d that trains its own weight and saves its input as a fixed-rate code for grad_W
    (grad_X needs the weight alone and stays exact)."""

    functional = staticmethod(ops.quantized_conv2d)

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, stride: int | tuple[int, int],
                 padding: int | tuple[int, int], dilation: int | tuple[int, int], groups: int, bits: int,
                 group: int) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation = tuple(pair(stride)), tuple(pair(padding)), tuple(pair(dilation))
        self.groups, self.bits, self.group = groups, bits, group

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int, group: int) -> QuantizedConv2d:
        """The layer for an nn.Conv2d, sharing its weight and bias."""
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, bits, group)

    def arguments(self) -> tuple:
        """Everything `functional` takes after x: graphs without modules call it with these."""
        return self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.bits, self.group

    def forward(self, x: Tensor) -> Tensor:
        return ops.quantized_conv2d(x, *self.arguments())

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"{self.bits} bits per element")
