"""GGUF targets: the type table, specs and configs, and RTN / GPTQ / GSQ on each type's scale
lattice (`gsq.quant.target`, `gsq.quant.lattice`; formats.md B.5, B.6; issue 3).

The checks that matter: every result is held exactly by its type (`exact_problem(...) is None`,
the exporter's own fitter), and searching on the lattice beats the old route of searching bf16
scales and snapping them onto the lattice afterwards.
"""

from __future__ import annotations

import pytest
import torch

from gsq.config import QuantizeConfig, cpu_preset
from gsq.errors import GSQError
from gsq.export.gguf_blocks import exact_problem, snap_scales
from gsq.gguf import TYPES as BLOCK_TYPES
from gsq.quant.gptq import gptq_quantize, layer_output_error
from gsq.quant.grids import group_view, round_to_grid
from gsq.quant.lattice import (
    Fp16Lattice,
    KLattice,
    _affine_kmax,
    lattice_init,
    project_ste,
    target_rtn,
)
from gsq.quant.layerwise import QuadraticObjective
from gsq.quant.quantizers import InitConfig, make_quantizer
from gsq.quant.rtn import rtn_quantize
from gsq.quant.target import TARGETS, fallback_target, parse_target, target_spec
from gsq.quant.trainer import TrainConfig, train_quantizers
from gsq.quant.types import QuantizedWeight, QuantSpec

ALL = tuple(TARGETS)  # Q4_0, Q2_0, TQ1_0, TQ2_0, Q2_K, Q3_K, Q4_K
K_TYPES = ("Q2_K", "Q3_K", "Q4_K")
OUT, IN = 48, 512  # two 256-column super-blocks per row


def _weight(seed: int = 0, out: int = OUT, cols: int = IN) -> torch.Tensor:
    """Gaussian weights with per-row and heavy per-column scales (input-channel outliers), so that
    the groups of one super-block have quite different scales, as in real layers."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.exp(0.3 * torch.randn(out, 1, generator=gen))
    columns = torch.exp(0.8 * torch.randn(1, cols, generator=gen))
    return 0.02 * torch.randn(out, cols, generator=gen) * rows * columns


def _hessian(seed: int = 1, n: int = 1024, cols: int = IN, rho: float = 0.8) -> torch.Tensor:
    """2/n XᵀX of AR(1)-correlated inputs with uneven channel magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, cols, generator=gen)
    X = torch.empty_like(Z)
    X[:, 0] = Z[:, 0]
    for j in range(1, cols):
        X[:, j] = rho * X[:, j - 1] + (1 - rho**2) ** 0.5 * Z[:, j]
    X = X * torch.exp(0.5 * torch.randn(1, cols, generator=gen))
    return 2.0 / n * X.T @ X


@pytest.fixture(scope="module")
def problem():
    return _weight(), _hessian()


# --------------------------------------------------------------------------------------------
# The table, names, specs and configs


@pytest.mark.parametrize("name", ALL)
def test_target_table_agrees_with_the_block_types(name):
    tt, bt = TARGETS[name], BLOCK_TYPES[name]
    assert (tt.row_unit, tt.group_size) == (bt.block_size, bt.sub_block)
    assert tt.family == bt.family and tt.bpw == bt.bpw
    assert QuantSpec(tt.max_bits, 1).levels == QuantSpec(bt.max_bits, 1).levels
    if tt.is_k:
        assert tt.k_range == bt.k_range and tt.offsets == bt.offsets
        assert tt.code_max == (bt.code_range[1] if tt.family == "affine_k" else 0)


def test_target_table_is_the_one_the_quantizers_were_built_on():
    """TARGETS is derived from the GGUF type table; this is the table as it was written by hand
    before (a change of a type's facts must show here)."""
    from gsq.quant.target import FALLBACK_RULE, TargetType

    T3 = "ternary"
    want = {t.name: t for t in (
        TargetType("Q4_0", 4, 4, 32, 32, "fp16", 4.5),
        TargetType("Q2_0", 2, 2, 64, 64, "fp16", 2.25),
        TargetType("TQ1_0", T3, T3, 256, 256, "fp16", 1.6875),
        TargetType("TQ2_0", T3, 2, 256, 256, "fp16", 2.0625),
        TargetType("Q2_K", 2, 2, 16, 256, "affine_k", 2.625, (0, 15), 3, (2, 1)),
        TargetType("Q3_K", 3, 3, 16, 256, "signed_k", 3.4375, (-32, 31)),
        TargetType("Q4_K", 4, 4, 32, 256, "affine_k", 4.5, (0, 63), 15, (8, 4, 2, 1)),
    )}
    assert want == TARGETS
    assert list(TARGETS) == ["Q4_0", "Q2_0", "TQ1_0", "TQ2_0", "Q2_K", "Q3_K", "Q4_K"]
    assert FALLBACK_RULE == {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q4_0", "TQ1_0": "Q4_0",
                             "TQ2_0": "Q4_0", "Q2_0": "Q4_0"}


@pytest.mark.parametrize("text, name", [("gguf:Q2_K", "Q2_K"), ("gguf:q4_0", "Q4_0"),
                                        ("TQ2_0", "TQ2_0"), (" GGUF:q3_k ", "Q3_K")])
def test_parse_target(text, name):
    assert parse_target(text) == name


@pytest.mark.parametrize("text, needle", [("gguf:Q5_9", "unknown GGUF target"),
                                          ("Q6_K", "unknown GGUF target"),
                                          ("exl2:Q2_K", "only GGUF targets")])
def test_parse_target_refuses(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_target(text)


def test_implied_specs_labels_and_bits_per_weight():
    want = {"Q4_0": (4, 32), "Q2_0": (2, 64), "TQ1_0": ("ternary", 256),
            "TQ2_0": ("ternary", 256), "Q2_K": (2, 16), "Q3_K": (3, 16), "Q4_K": (4, 32)}
    for name, (bits, g) in want.items():
        spec = target_spec(f"gguf:{name}")
        assert (spec.bits, spec.group_size, spec.target) == (bits, g, name)
        assert spec.bpp == BLOCK_TYPES[name].bpw
    assert target_spec("q2_k").label == "2-bit g16 (Q2_K)"
    assert QuantSpec(2, 16, "q2_k").target == "Q2_K"
    assert QuantSpec("ternary", 16, "Q2_K").target == "Q2_K"  # a narrower grid is held
    assert QuantSpec(2, 128).target is None and QuantSpec(2, 128).label == "2-bit g128"


@pytest.mark.parametrize("bits, group_size, needle", [
    (2, 128, "one scale per 16 columns"), (3, 16, "at most 2-bit"), (4, 16, "at most 2-bit")])
def test_specs_contradicting_the_target_are_refused(bits, group_size, needle):
    with pytest.raises(ValueError, match=needle):
        QuantSpec(bits, group_size, "Q2_K")


def test_config_targeting_and_fallback():
    cfg = cpu_preset().targeting("gguf:Q3_K")
    assert (cfg.target, cfg.bits, cfg.group_size, cfg.fallback) == ("Q3_K", 3, 16, None)
    assert cfg.spec_for("m.up", 256) == QuantSpec(3, 16, "Q3_K")
    assert cfg.spec_for("m.down", 320) == QuantSpec(4, 32, "Q4_0")  # llama.cpp's rule
    assert cfg.spec_for("m.down") == QuantSpec(3, 16, "Q3_K")  # width unknown: no fallback
    user = cpu_preset().targeting("Q4_K", fallback="gguf:Q2_0")
    assert user.spec_for("m.down", 320) == QuantSpec(2, 64, "Q2_0")
    assert cpu_preset().targeting("Q2_K", bits="ternary").spec_for("m", 512).bits == "ternary"
    assert cfg.to_dict()["target"] == "Q3_K"
    assert fallback_target("Q4_0", 320) == "Q4_0" and fallback_target("TQ2_0", 96) == "Q4_0"
    with pytest.raises(GSQError, match="m.down: input width 320 fits neither GGUF Q2_K.*TQ2_0"):
        cpu_preset().targeting("Q2_K", fallback="TQ2_0").spec_for("m.down", 320)
    with pytest.raises(GSQError, match="Q4_0"):
        cpu_preset().targeting("Q4_0").spec_for("m.x", 48)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(target="Q2_K", bits=2, group_size=128), "one scale per 16"),
    (dict(target="Q2_0", bits=4, group_size=64), "at most 2-bit"),
    (dict(target="Q9_K", bits=2, group_size=16), "unknown GGUF target"),
    (dict(fallback="Q4_0"), "needs a target"),
    (dict(target="Q2_K", bits=2, group_size=16, fallback="IQ2_XS"), "unknown GGUF target"),
    (dict(target="Q2_K", bits=2, group_size=16, bits_overrides=(("*.down_proj", 4),)),
     "cannot be combined"),
])
def test_bad_target_configs(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantizeConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Exactness of every initialiser and of GSQ


def _gsq(init: QuantizedWeight, W: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, ...]:
    """A few Q/K-style steps with a large scale lr (so scales cross lattice points); the last
    epoch is kept, not the best, so the trained result is what comes back."""
    q = make_quantizer(init, InitConfig(), torch.Generator().manual_seed(0))
    cfg = TrainConfig(epochs=2, batch_size=1, micro_batch_size=1, cosine=False, scale_lr=2e-3,
                      keep_best=False)
    run = train_quantizers({"w": q}, QuadraticObjective("w", W, H, H, 4), cfg, seed=0)
    return run.results["w"], q


@pytest.mark.parametrize("name", ALL)
def test_rtn_gptq_and_gsq_results_are_held_exactly(problem, name):
    W, H = problem
    spec = target_spec(name)
    rtn = rtn_quantize(W, spec)
    gptq = gptq_quantize(W, H, spec)
    gsq, quantizer = _gsq(gptq, W, H)
    for qw in (rtn, gptq, gsq):
        assert qw.spec == spec and qw.codes.dtype == torch.int8
        assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
        assert (qw.scale != 0).all()
        assert exact_problem(name, qw) is None
    assert not torch.equal(gsq.scale, gptq.scale)  # the trained scales moved on the lattice
    assert not torch.equal(quantizer.scale.detach(), gsq.scale)  # ... from a latent fp32 value


@pytest.mark.parametrize("name", ["Q2_K", "Q4_0"])
def test_static_groups_and_narrow_grids_are_held_exactly(problem, name):
    W, H = problem
    for spec in (target_spec(name), target_spec(name, bits="ternary")):
        assert exact_problem(name, gptq_quantize(W, H, spec, static_groups=True)) is None
        assert exact_problem(name, rtn_quantize(W, spec)) is None


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not a multiple of the GGUF Q2_K block size 256"):
        lattice_init(torch.randn(4, 320), target_spec("Q2_K"))


# --------------------------------------------------------------------------------------------
# Lattice-aware search beats "search in bf16, then snap onto the lattice"


def _snapped(W_r: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of `W_r` re-rounded against bf16 scales snapped onto the target (the lossy export's
    route), dequantized. A scale whose k rounds to 0 zeroes its group (B.6)."""
    snapped = snap_scales(spec.target, scale, spec.group_size, bits=spec.bits).unsqueeze(-1)
    safe = torch.where(snapped != 0, snapped, 1.0)
    codes = round_to_grid(group_view(W_r, spec.group_size), safe, spec)
    return (snapped * codes).reshape(W_r.shape)


@pytest.mark.parametrize("name", K_TYPES)
def test_lattice_rtn_beats_bf16_search_then_snap_on_weight_error(problem, name):
    W, _ = problem
    spec = target_spec(name)
    plain = rtn_quantize(W, QuantSpec(spec.bits, spec.group_size))
    ours = float(((rtn_quantize(W, spec).dequantize() - W) ** 2).sum())
    snapped = float(((_snapped(W, plain.scale, spec) - W) ** 2).sum())
    free = float(((plain.dequantize() - W) ** 2).sum())  # bf16 scales, no lattice
    # the lattice costs something either way; searching on it saves at least a quarter of that
    assert ours - free < 0.75 * (snapped - free), (ours, snapped, free)


@pytest.mark.parametrize("name", K_TYPES)
def test_lattice_gptq_beats_bf16_gptq_then_snap_on_hessian_error(problem, name):
    W, H = problem
    spec = target_spec(name)
    plain = gptq_quantize(W, H, QuantSpec(spec.bits, spec.group_size))
    ours = layer_output_error(W, gptq_quantize(W, H, spec).dequantize(), H)
    snapped = layer_output_error(W, _snapped(plain.dequantize(), plain.scale, spec), H)
    free = layer_output_error(W, plain.dequantize(), H)
    assert ours - free < 0.75 * (snapped - free), (ours, snapped, free)
    assert ours < snapped


@pytest.mark.parametrize("name", ["Q4_0", "Q2_0", "TQ2_0"])
def test_fp16_targets_lose_nothing_against_bf16(problem, name):
    """fp16 holds every bf16 scale of this range, so the lattice is only finer: within 1 %."""
    W, H = problem
    spec = target_spec(name)
    plain = gptq_quantize(W, H, QuantSpec(spec.bits, spec.group_size))
    ours = layer_output_error(W, gptq_quantize(W, H, spec).dequantize(), H)
    assert ours < 1.01 * layer_output_error(W, plain.dequantize(), H)


# --------------------------------------------------------------------------------------------
# Lattices


def test_affine_offsets_bound_k_as_formats_b5_says():
    """Q2_K: one sign per super-block keeps k <= 15; mixed signs allow only k <= 7 on the
    {-2..1} side (its offset 2|s| = dmin*m needs m = 2k <= 15). Q4_K mixed: 63 // 8."""
    tt, spec = TARGETS["Q2_K"], target_spec("Q2_K")
    same = torch.ones(1, 16)
    assert _affine_kmax(tt, spec, same).tolist() == [[15.0] * 16]
    assert _affine_kmax(tt, spec, -same).tolist() == [[15.0] * 16]
    mixed = torch.tensor([[1.0] * 8 + [-1.0] * 8])
    assert _affine_kmax(tt, spec, mixed).tolist() == [[7.0] * 8 + [15.0] * 8]
    q4k = _affine_kmax(TARGETS["Q4_K"], target_spec("Q4_K"), torch.tensor([[1.0] * 7 + [-1.0]]))
    assert q4k.tolist() == [[7.0] * 7 + [9.0]]


@pytest.mark.parametrize("name", K_TYPES)
def test_projection_is_idempotent_and_exact_for_any_scales(problem, name):
    W, _ = problem
    spec = target_spec(name)
    scale, lattice = lattice_init(W, spec)
    assert isinstance(lattice, KLattice)
    assert torch.equal(lattice.project(scale), scale)
    gen = torch.Generator().manual_seed(3)
    wild = scale * torch.exp(0.5 * torch.randn(scale.shape, generator=gen))
    wild[0, :3] = torch.tensor([0.0, -1.0, 1e-9])  # zero, wrong sign, tiny
    projected = lattice.project(wild)
    assert (projected != 0).all() and torch.equal(lattice.project(projected), projected)
    codes = torch.randint(spec.qmin, spec.qmax + 1, W.shape, generator=gen, dtype=torch.int8)
    assert exact_problem(name, QuantizedWeight(codes, projected, spec)) is None


def test_fp16_lattice_and_straight_through_gradient():
    lattice = Fp16Lattice(target_spec("Q4_0"))
    s = torch.tensor([[0.0123456, -3e-9, 1e6]], requires_grad=True)
    p = project_ste(s, lattice)
    assert p.tolist() == [[float(torch.tensor(0.0123456).half()), -(2.0**-24), 65504.0]]
    (p * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert s.grad.tolist() == [[1.0, 2.0, 3.0]]


def test_k_target_quantizer_needs_its_lattice(problem):
    W, _ = problem
    qw = target_rtn(W, target_spec("Q3_K"))
    with pytest.raises(ValueError, match="must carry the scale lattice"):
        make_quantizer(QuantizedWeight(qw.codes, qw.scale, qw.spec), InitConfig(),
                       torch.Generator().manual_seed(0))
    assert make_quantizer(qw.to("cpu"), InitConfig(), torch.Generator()).lattice is not None
