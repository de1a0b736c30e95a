"""Bit packing of ReLU/dropout masks and max-pool codes: lossless, and exactly ceil(n*bits/8) bytes."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from facto_fx.ops.bitpack import (
    empty_in_code_order,
    in_code_order,
    mask_flags,
    pack_bits,
    pack_pieces,
    unpack_bits,
    unpack_codes,
)
from facto_fx.shapes import code_bits, is_channels_last


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
@example(bits=1, n=1, seed=0)
@example(bits=2, n=1, seed=0)
@example(bits=4, n=1, seed=0)
@example(bits=8, n=1, seed=0)
def test_round_trip_and_size(bits, n, seed):
    """Every code in [0, 2**bits) survives packing, for lengths that do not fill the last byte too."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_extreme_codes(bits):
    """All-zero and all-max codes exercise every bit position of every byte."""
    for value in (0, 2**bits - 1):
        codes = torch.full((13,), value, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 13), codes)


def test_bool_mask_any_shape():
    """Masks are packed from bool tensors of any shape along their flattened order."""
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_bits(mask, 1)
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, 1, mask.numel()).view(mask.shape).bool(), mask)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_channels_last_codes_go_in_memory_order(bits):
    """A channels_last map's codes are packed as they lie in memory, (N, H, W, C), and come back as
    a channels_last view of the unpacked bytes."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2**bits, (2, 3, 5, 7), generator=g).to(torch.uint8)
    codes = codes.contiguous(memory_format=torch.channels_last)
    packed = pack_bits(codes, bits, channels_last=True)
    assert torch.equal(packed, pack_bits(codes.as_strided((codes.numel(),), (1,)), bits))  # memory order
    unpacked = unpack_codes(packed, bits, codes.shape, channels_last=True)
    assert torch.equal(unpacked, codes) and unpacked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(unpack_codes(pack_bits(codes, bits), bits, codes.shape), codes)  # logical order


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (torch.empty(2, 3, 4, 5), False),
        (torch.empty(2, 3, 4, 5, memory_format=torch.channels_last), True),
        (torch.empty(2, 1, 4, 5, memory_format=torch.channels_last), False),  # contiguous too: one order
        (torch.empty(2, 3, 4, 10)[..., ::2], False),
        (torch.empty(3, 4, 5), False),
    ],
    ids=["contiguous", "channels_last", "one_channel", "strided", "3d"],
)
def test_is_channels_last(x, expected):
    assert is_channels_last(x) is expected


@pytest.mark.parametrize("bits", [0, 3, 16])
def test_unsupported_width_raises(bits):
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)


@pytest.mark.parametrize(("num_codes", "bits"), [(1, 1), (2, 1), (3, 2), (4, 2), (9, 4), (16, 4), (17, 8), (256, 8)])
def test_code_bits(num_codes, bits):
    """Max-pool windows of kh*kw positions need the smallest supported width that holds them."""
    assert code_bits(num_codes) == bits


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 8, 13, 4099])
@pytest.mark.parametrize("offset", [0, 3])
def test_byte_j_holds_codes_in_order_from_its_low_bits(bits, n, offset):
    """The byte layout every path shares (the Triton kernels too): byte j holds codes
    j·(8 / bits) + i at bits [bits·i, bits·(i + 1)), counted in Python integers. An offset view
    checks codes that do not start on a word boundary; all-max codes check that no carry spills."""
    per_byte = 8 // bits
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2**bits, (n + offset,), generator=g).to(torch.uint8)[offset:]
    for case in (codes, torch.full_like(codes, 2**bits - 1)):
        values = case.tolist()
        expected = [
            sum(v << (bits * i) for i, v in enumerate(values[per_byte * j : per_byte * (j + 1)]))
            for j in range(math.ceil(n / per_byte))
        ]
        assert pack_bits(case, bits).tolist() == expected
    mask = codes > 0
    assert pack_bits(mask, 1).tolist() == pack_bits(mask.to(torch.uint8), 1).tolist()


@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_flags_are_nonzero_exactly_where_the_mask_is_set(channels_last):
    """The unnormalised 1-bit unpacking that ReLU's backward reads, piece by piece: zero / nonzero as
    the mask in code order (the map's permuted to N, H, W, C by hand for channels_last), for a
    length that does not fill the last byte and for a piece starting at a later byte."""
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.5
    if channels_last:
        mask = mask.contiguous(memory_format=torch.channels_last)
    packed = pack_bits(mask, 1, channels_last)
    ordered = (mask.permute(0, 2, 3, 1) if channels_last else mask).reshape(-1)
    flags = mask_flags(packed, mask.numel())
    assert flags.dtype == torch.uint8 and torch.equal(flags != 0, ordered)
    assert torch.equal(mask_flags(packed[3:], 20) != 0, ordered[24:44])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_code_order_flattens_as_pack_bits_orders(layout, channels_last):
    """in_code_order(t) lists t's elements in the order pack_bits(·, channels_last) packs codes, for
    a tensor in any layout; empty_in_code_order's view writes into its tensor in that order."""
    t = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        t = torch.arange(2 * 3 * 4 * 10).view(2, 3, 4, 10)[..., ::2]
    expected = (t.permute(0, 2, 3, 1) if channels_last else t).reshape(-1)
    assert torch.equal(in_code_order(t, channels_last), expected)
    out, flat = empty_in_code_order(t, channels_last)
    flat.copy_(expected)
    assert torch.equal(out, t) and out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [13, (1 << 18) * 2 + 5])
def test_pack_pieces_packs_as_pack_bits_does(bits, numel):
    """Codes computed and packed a piece at a time (several pieces for the larger length, whose
    last piece does not fill a byte) equal pack_bits of the whole, and the piece function sees
    every element once."""
    values = torch.randint(0, 1 << bits, (numel,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    seen = []

    def codes_of(piece):
        seen.append(piece.numel())
        return piece

    assert torch.equal(pack_pieces(values, bits, codes_of), pack_bits(values, bits))
    assert sum(seen) == numel and (len(seen) > 1) == (numel > 1 << 18)
