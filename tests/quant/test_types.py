"""QuantSpec and QuantizedWeight: bit-widths, bpp, validation, shapes (method §5, §13)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gsq.quant.types import QuantizedWeight, QuantSpec, parse_bits


@pytest.mark.parametrize("bits, expected", [
    (2, 2.125),
    (3, 3.125),
    (4, 4.125),
    ("ternary", math.log2(3) + 0.125),
])
def test_bpp_at_group_128(bits, expected):
    spec = QuantSpec(bits, 128)
    assert spec.bpp == pytest.approx(expected, rel=0, abs=1e-15)


def test_bpp_exact_values():
    assert QuantSpec(2, 128).bpp == 2.125
    assert QuantSpec(3, 128).bpp == 3.125
    assert QuantSpec(2, 64).bpp == 2.25
    assert QuantSpec("ternary", 128).code_bits == math.log2(3)


@pytest.mark.parametrize("bits, qmin, qmax, levels", [
    (2, -2, 1, 4), (3, -4, 3, 8), (4, -8, 7, 16), ("ternary", -1, 1, 3),
])
def test_grid_ranges(bits, qmin, qmax, levels):
    spec = QuantSpec(bits, 32)
    assert (spec.qmin, spec.qmax, spec.levels) == (qmin, qmax, levels)
    assert spec.is_ternary == (bits == "ternary")


@pytest.mark.parametrize("bits", [1, 5, 8, 0, "2", "binary", None, 2.0 + 0.5])
def test_quantspec_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantSpec(bits, 128)


@pytest.mark.parametrize("group_size", [0, -128, 1.5, "128", None])
def test_quantspec_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group size"):
        QuantSpec(2, group_size)


def test_quantspec_is_frozen_and_labelled():
    spec = QuantSpec(3, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 2  # type: ignore[misc]
    assert spec.label == "3-bit g64"
    assert QuantSpec("ternary", 128).label == "ternary g128"


@pytest.mark.parametrize("text, expected", [
    ("2", 2), ("3", 3), (" 4 ", 4), (2, 2), ("ternary", "ternary"), ("Ternary", "ternary"),
    ("1.58", "ternary"),
])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["1", "5", "8", "two", "", "2.5"])
def test_parse_bits_rejects(text):
    with pytest.raises(ValueError, match="bits must be one of"):
        parse_bits(text)


def test_quantized_weight_shapes_and_dequantize():
    spec = QuantSpec(2, 4)
    codes = torch.tensor([[-2, -1, 0, 1, 1, 1, -2, 0]], dtype=torch.int8)
    scale = torch.tensor([[0.5, -2.0]])
    qw = QuantizedWeight(codes, scale, spec)
    assert qw.shape == (1, 8)
    expected = torch.tensor([[-1.0, -0.5, 0.0, 0.5, -2.0, -2.0, 4.0, -0.0]])
    assert torch.equal(qw.dequantize(), expected)
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16
    moved = qw.to("cpu")
    assert torch.equal(moved.codes, codes) and moved.spec == spec


def test_quantized_weight_rejects_group_not_dividing_width():
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedWeight(torch.zeros(2, 10, dtype=torch.int8), torch.ones(2, 2), QuantSpec(2, 4))


@pytest.mark.parametrize("scale_shape", [(2, 3), (3, 2), (2,), (2, 2, 1)])
def test_quantized_weight_rejects_bad_scale_shape(scale_shape):
    with pytest.raises(ValueError, match="scale shape"):
        QuantizedWeight(torch.zeros(2, 8, dtype=torch.int8), torch.ones(scale_shape),
                        QuantSpec(2, 4))
