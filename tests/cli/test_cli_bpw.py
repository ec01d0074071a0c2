"""`gsq quantize --bpw X`: widths allocated by sensitivity hit the requested average."""

from __future__ import annotations

import fnmatch
import json

import pytest
from test_cli import _assert_user_error, _quantize_args, _text

from gsq.cli.__main__ import main
from gsq.io.quantized_dir import load_records


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(_text(4000, 0))
    return path


def _bpp(records) -> float:
    bits = sum(qw.spec.bpp * qw.codes.numel() for qw in records.values())
    return bits / sum(qw.codes.numel() for qw in records.values())


@pytest.mark.parametrize("method,bpw", [("rtn", 2.75), ("gsq", 3.2)])
def test_bpw_hits_its_average(tiny_llama_dir, calib_file, tmp_path, method, bpw):
    """Group size 32: widths cost 2.5 / 3.5 / 4.5 bits per weight. The quantized tensors' own
    bits per weight equal the allocation's, never above the target, and the unspent budget is
    smaller than any upgrade left (what `allocate_bits` promises)."""
    out = tmp_path / "q"
    assert main(_quantize_args(tiny_llama_dir, out, calib_file, "--method", method,
                               "--bpw", str(bpw))) == 0
    report = json.loads((out / "report.json").read_text())
    alloc = report["allocation"]
    records = load_records(out)
    assert len(records) == 14
    assert _bpp(records) == pytest.approx(alloc["achieved_bpw"], abs=1e-12)
    assert report["bpp"] == pytest.approx(alloc["achieved_bpw"], abs=1e-12)
    assert alloc["achieved_bpw"] <= bpw
    widths = {qw.spec.bits for qw in records.values()}
    assert len(widths) >= 2, widths  # a real mix, not a uniform width
    for name, qw in records.items():
        assert qw.spec.bits == alloc["widths"][name]
    # no unit left below 4 bit could have been upgraded within the budget
    total = sum(qw.codes.numel() for qw in records.values())
    slack = (bpw - alloc["achieved_bpw"]) * total
    for name, qw in records.items():
        if qw.spec.bits < 4:
            assert qw.codes.numel() * 1.0 > slack - 1e-6, name  # the next width costs 1 bit/weight


def test_bpw_below_the_cheapest_width_is_refused(capsys, tiny_llama_dir, calib_file,
                                                 tmp_path):
    out = tmp_path / "q"
    _assert_user_error(capsys, _quantize_args(tiny_llama_dir, out, calib_file, "--method", "rtn",
                                              "--bpw", "2.2"), out, "below the cheapest")


@pytest.mark.parametrize("extra", [("--bits-override", "*.q_proj=3"), ("--target", "gguf:Q4_0")])
def test_bpw_excludes_per_module_widths_and_targets(capsys, tiny_llama_dir,
                                                    calib_file, tmp_path, extra):
    out = tmp_path / "q"
    _assert_user_error(capsys, _quantize_args(tiny_llama_dir, out, calib_file, "--bpw", "3",
                                              *extra), out, "bpw")


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_bpw_on_moe_gives_each_merged_expert_tensor_one_width(arch_model_dir, calib_file,
                                                              tmp_path, arch):
    out = tmp_path / "q"
    assert main(_quantize_args(arch_model_dir(arch), out, calib_file, "--method", "gsq",
                               "--bpw", "3.0")) == 0
    report = json.loads((out / "report.json").read_text())
    records = load_records(out)
    patterns = [p for p in report["allocation"]["widths"] if "*" in p]
    assert len(patterns) == 2 * 3  # two MoE blocks, three projections
    for pattern in patterns:
        covered = {qw.spec.bits for n, qw in records.items() if fnmatch.fnmatch(n, pattern)}
        assert covered == {report["allocation"]["widths"][pattern]}, pattern
    assert report["bpp"] == pytest.approx(report["allocation"]["achieved_bpw"], abs=1e-12)
    assert report["bpp"] <= 3.0
