"""The GGUF type table: the views other modules derive from it equal the tables they used to
write by hand (a changed fact must show here), and its ids for the types the gguf package lacks."""

from __future__ import annotations

import gguf

from gsq.eval.llamacpp_numerics import ACTIVATION_ROUNDING
from gsq.gguf import TYPES, file_type, package_lacks, row_bytes, type_id, type_name
from gsq.gguf.types import UNKNOWN_FILE_TYPE


def test_activation_partners():
    q8_0 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_0")
    q8_k = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
    want = {**dict.fromkeys(q8_0, "q8_0"), **dict.fromkeys(q8_k, "q8_K"), "F16": "f16",
            "BF16": "bf16", "F32": None}
    assert want == ACTIVATION_ROUNDING


def test_file_types():
    named = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K": 12,
             "Q4_K": 15, "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37, "Q2_0": 41}
    for name in TYPES:
        assert file_type(name) == named.get(name, UNKNOWN_FILE_TYPE), name
    assert file_type("IQ4_XS") == UNKNOWN_FILE_TYPE


def test_types_the_gguf_package_lacks():
    assert package_lacks("Q2_0") and not package_lacks("Q4_0")
    assert (type_id("Q2_0"), type_name(42)) == (42, "Q2_0")
    assert row_bytes(42, 128) == 36
    # types gsq does not encode still have ids and sizes (from the gguf package)
    iq = gguf.GGMLQuantizationType.IQ4_XS
    assert type_name(int(iq)) == "IQ4_XS" and type_id("IQ4_XS") == int(iq)
    assert row_bytes(int(iq), 512) == 2 * gguf.GGML_QUANT_SIZES[iq][1]


def test_refinable_types_are_the_block_types():
    assert [n for n, t in TYPES.items() if t.refinable] == [
        n for n, t in TYPES.items() if t.family != "float"]
    assert {n for n, t in TYPES.items() if not t.refinable} == {"F32", "F16", "BF16"}
