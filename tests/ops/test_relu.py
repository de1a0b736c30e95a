"""facto relu: identical to torch.relu forward and backward, while saving one bit per element."""

import math

import pytest
import torch
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto
from facto_fx.ops.bitpack import pack_bits


def _input(shape, seed=0):
    """Random values with a share of exact zeros, where torch's relu gradient is 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=g) < 0.2, torch.zeros_like(x), x)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (2, 3, 4, 5)])
def test_forward_and_grad_match_torch(shape):
    x = _input(shape)
    assert (x == 0).any() or x.numel() == 1
    fx, rx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = facto.relu(fx), torch.relu(rx)
    assert torch.equal(y, y_ref)
    grad_y = torch.randn_like(x)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert torch.equal(fx.grad, rx.grad)


@pytest.mark.parametrize(
    "view", [lambda t: t.transpose(0, 2), lambda t: t[1:, ::2]], ids=["transposed", "sliced"]
)
def test_non_contiguous_input(view):
    """Inputs neither contiguous nor channels_last: the mask is packed in logical order."""
    x = _input((3, 5, 7), seed=1)
    fx, rx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = facto.relu(view(fx)), torch.relu(view(rx))
    assert torch.equal(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert torch.equal(fx.grad, rx.grad)


@pytest.mark.parametrize("grad_layout", [torch.channels_last, torch.contiguous_format])
def test_channels_last_input(grad_layout):
    """y stays channels_last, the mask is packed in memory order (no copy of x), and the gradient is
    torch's whatever the layout of grad_y."""
    x = _input((2, 3, 4, 5), seed=2).contiguous(memory_format=torch.channels_last)
    fx, rx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    saved = _saved(lambda: facto.relu(fx))
    assert torch.equal(saved[0], pack_bits(x.as_strided((x.numel(),), (1,)) > 0, 1))
    y, y_ref = facto.relu(fx), torch.relu(rx)
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride() == x.stride()
    grad_y = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=grad_layout)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert torch.equal(fx.grad, rx.grad)


def test_grad_at_exact_zero_is_zero():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0], requires_grad=True)
    facto.relu(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize("shape", [(1,), (13,), (3, 5, 7), (2, 8, 4)])
def test_saves_one_bit_per_element(shape):
    """The only saved tensor is the packed mask: ceil(numel / 8) uint8 bytes, odd numel included."""
    x = _input(shape).requires_grad_(True)
    saved = _saved(lambda: facto.relu(x))
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, math.ceil(x.numel() / 8))]


def test_negative_infinity_maps_to_zero():
    """-inf * 0 would be nan: the output must come from relu itself, not x * mask."""
    x = torch.tensor([-float("inf"), -1.0, 2.0], requires_grad=True)
    assert torch.equal(facto.relu(x), torch.relu(x))


def test_no_grad_path_matches():
    x = _input((4, 5))
    assert torch.equal(facto.relu(x), torch.relu(x))


@pytest.mark.parametrize("shape", [(3, 5, 7), (1,)])
def test_opcheck(shape):
    torch.library.opcheck(torch.ops.facto.relu.default, (_input(shape).requires_grad_(True),))


def test_backward_is_zero_where_masked_even_for_an_infinite_gradient():
    x = torch.tensor([-1.0, 0.0, 2.0, -3.0])
    grad_y = torch.tensor([float("inf"), float("nan"), float("inf"), 1.0])
    expected, actual = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.relu(expected).backward(grad_y)
    facto.relu(actual).backward(grad_y)
    assert torch.equal(actual.grad, expected.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("x_layout", "grad_layout"), [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw")])
def test_a_map_of_many_pieces_matches_torch(dtype, x_layout, grad_layout):
    """A map the CPU backward runs in several pieces (ops/chunks.py), its size no multiple of 8 and
    of a piece: torch's gradient bit for bit, in every dtype and layout."""
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    x = _input((3, 17, 101, 103), seed=5).to(dtype).contiguous(memory_format=formats[x_layout])
    fx, rx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad_y = torch.randn(x.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=formats[grad_layout])
    facto.relu(fx).backward(grad_y)
    torch.relu(rx).backward(grad_y)
    assert torch.equal(fx.grad, rx.grad)


def test_the_backward_holds_little_besides_the_gradient():
    """The unpacked mask, cast to the gradient's dtype, is never a full-size temporary: the CPU
    backward's peak (the allocator's events) is the gradient and one piece's temporaries (its flags
    as int64 words, as bytes, as fp32: 13 bytes an element), here a quarter of a full-size mask."""
    from facto_fx.memory import peak_step_bytes
    from facto_fx.ops.chunks import CPU_PIECE_ELEMENTS
    from facto_fx.ops.relu import grad_input

    x = torch.randn(8, 32, 80, 80)
    grad_y, packed = torch.randn_like(x), pack_bits(x > 0, 1)
    assert peak_step_bytes(lambda: grad_input(grad_y, packed, False)) <= 4 * x.numel() + 13 * CPU_PIECE_ELEMENTS
