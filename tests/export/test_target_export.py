"""In-format GSQ end to end: `gsq quantize --target gguf:TYPE` -> `gsq export --format gguf` ->
llama.cpp (issue 3, item 2).

A tiny random Llama (hidden 256, intermediate 320) is quantized with GSQ at a tiny budget for each
target type. Its MLP down projection has 320-column rows, not whole 256-blocks (like SmolLM2's
576-wide inputs), so under K/TQ targets it gets the fallback type Q4_0, which the run reports.
The default export must write every quantized tensor in its recorded type and decode, weight for
weight, to the model gsq evaluated; llama.cpp must then agree with gsq far more closely than
quantization moved the model. A negative control: bf16 scales rounded onto Q2_K at export
(`--lossy`) do not give the evaluated model.

Tests that need llama_cpp fail (not skip) when it is missing: CI installs it with `.[dev]`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gsq.cli.__main__ import main
from gsq.gguf import decode_weight, model_hparams, permute_rows, qk_heads, read_gguf, tensor_name
from gsq.io.quantized_dir import META_FILE
from gsq.models.quantized import load_quantized

TARGETS = ("Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q2_0", "TQ2_0")
NEEDS_256 = {"Q2_K", "Q3_K", "Q4_K", "TQ2_0"}  # K and TQ types: rows of whole 256-blocks
TINY_GSQ = ["--method", "gsq", "--nsamples", "4", "--val-samples", "2", "--gptq-samples", "4",
            "--seqlen", "32", "--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2",
            "--qk-steps", "4"]
SEQLEN, MAX_TOKENS = 64, 512
DOWN = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama, build_byte_bpe_tokenizer) -> dict[str, Path]:
    """The tiny HF Llama (256-wide, 320-wide MLP) and a calibration text."""
    from gsq.data.calibration import bundled_text_path, read_text

    root = tmp_path_factory.mktemp("target")
    tokenizer = build_byte_bpe_tokenizer()
    model = tiny_llama(0, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=320)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    (root / "calib.txt").write_text(read_text(bundled_text_path())[:20_000])
    return {"root": root, "hf": root / "hf", "calib": root / "calib.txt"}


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _quantize(files, out: Path, *flags: str) -> tuple[int, str]:
    return _cli(["-q", "quantize", str(files["hf"]), "--calib", str(files["calib"]), "--out",
                 str(out), *flags])


@pytest.fixture(scope="module", params=TARGETS)
def run(request, files) -> dict:
    """`gsq quantize --target gguf:TYPE` (GSQ, tiny budget) and the default `gsq export`."""
    qtype, root = request.param, files["root"]
    rc, printed = _quantize(files, root / f"q-{qtype}", "--target", f"gguf:{qtype}", *TINY_GSQ)
    assert rc == 0
    gguf = root / f"{qtype}.gguf"
    assert _cli(["-q", "export", str(root / f"q-{qtype}"), "--format", "gguf", "--out",
                 str(gguf)])[0] == 0
    model, tokenizer, records = load_quantized(root / f"q-{qtype}")
    return {"type": qtype, "qdir": root / f"q-{qtype}", "gguf": gguf, "printed": printed,
            "model": model, "tokenizer": tokenizer, "records": records}


def _expected(name: str, qw, hp) -> np.ndarray:
    """s·c in the row order llama.cpp expects (q/k rows permuted)."""
    gguf_name = tensor_name(f"{name}.weight", hp)
    heads = qk_heads(gguf_name, hp)
    weight = qw.dequantize()
    return (permute_rows(weight, heads) if heads else weight).numpy()


def _eval_tokens(tokenizer) -> torch.Tensor:
    from gsq.data.calibration import bundled_text_path, read_text, tokenize_text

    return tokenize_text(tokenizer, read_text(bundled_text_path())[40_000:50_000])


# --------------------------------------------------------------------------------------------
# The run, the file, llama.cpp


def test_run_records_the_target_and_reports_the_fallback(run):
    qtype = run["type"]
    report = json.loads((run["qdir"] / "report.json").read_text())
    want_fallback = dict.fromkeys(DOWN, "Q4_0") if qtype in NEEDS_256 else {}
    assert report["target"] == qtype and report["fallback"] == want_fallback
    assert report["target_types"] == ({qtype: 12, "Q4_0": 2} if want_fallback else {qtype: 14})
    meta = json.loads((run["qdir"] / META_FILE).read_text())
    assert {m["target"] for m in meta["modules"].values()} == {qtype, *want_fallback.values()}
    assert f"({qtype})" in run["printed"]
    line = "2 tensors whose rows are not whole {} blocks use the fallback Q4_0: {}"
    assert (line.format(qtype, ", ".join(DOWN)) in run["printed"]) == bool(want_fallback)
    for name, qw in run["records"].items():
        assert qw.spec.target == want_fallback.get(name, qtype), name


def test_gguf_decodes_to_the_evaluated_model_weight_for_weight(run):
    """Default export types = the recorded targets; every tensor bit-exact, and the scales were
    kept losslessly (fp32 storage: lattice values are not all bf16 values)."""
    model, records = run["model"], run["records"]
    hp = model_hparams(model.config)
    tensors = {t.name: t for t in read_gguf(run["gguf"])[1]}
    not_bf16 = 0
    for name, qw in records.items():
        t = tensors[tensor_name(f"{name}.weight", hp)]
        assert t.type_name == qw.spec.target, name
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name
        assert np.array_equal(decode_weight(t.type_name, t.data, qw.shape[1]),
                              _expected(name, qw, hp)), name
        not_bf16 += int((qw.scale.to(torch.bfloat16).float() != qw.scale).sum())
    assert not_bf16 > 0


def test_llamacpp_agrees_with_gsq(llama_cpp, run, files):
    from gsq.eval.kl import compare_with_base
    from gsq.eval.llamacpp import llamacpp_compare
    from gsq.models.loading import load_base_model

    tokens = _eval_tokens(run["tokenizer"])
    file_vs_gsq = llamacpp_compare(run["gguf"], run["model"], tokens, SEQLEN, MAX_TOKENS,
                                   progress=False)
    base, _ = load_base_model(str(files["hf"]))
    gsq_vs_base = compare_with_base(run["model"], base, tokens, SEQLEN, MAX_TOKENS,
                                    progress=False)
    assert file_vs_gsq["kl"] < 1e-4, file_vs_gsq
    assert file_vs_gsq["kl"] < 0.05 * gsq_vs_base["kl"], (file_vs_gsq, gsq_vs_base)
    assert file_vs_gsq["ppl"] == pytest.approx(file_vs_gsq["base_ppl"], rel=1e-3)


def test_negative_control_bf16_scales_rounded_onto_q2k_at_export(llama_cpp, files):
    """The old route: 2-bit g16 bf16 scales, exported as Q2_K with --lossy. The file is not the
    evaluated model (scales snapped, codes re-rounded), and llama.cpp shows it."""
    from gsq.eval.llamacpp import llamacpp_compare

    root = files["root"]
    assert _quantize(files, root / "q-bf16", "--bits", "2", "--group-size", "16",
                     *TINY_GSQ)[0] == 0
    gguf = root / "bf16-as-q2k.gguf"
    k_layers = ["--type", "*.self_attn.*=Q2_K", "--type", "*.gate_proj=Q2_K", "--type",
                "*.up_proj=Q2_K"]
    assert _cli(["-q", "export", str(root / "q-bf16"), "--format", "gguf", "--out", str(gguf),
                 "--lossy", *k_layers])[0] == 0
    model, tokenizer, records = load_quantized(root / "q-bf16")
    hp = model_hparams(model.config)
    tensors = {t.name: t for t in read_gguf(gguf)[1]}
    name = "model.layers.0.mlp.up_proj"
    t = tensors[tensor_name(f"{name}.weight", hp)]
    assert t.type_name == "Q2_K"
    want = _expected(name, records[name], hp)
    diff = decode_weight("Q2_K", t.data, 256) - want
    assert np.linalg.norm(diff) > 0.02 * np.linalg.norm(want)  # ~5 % RMS here
    bad = llamacpp_compare(gguf, model, _eval_tokens(tokenizer), SEQLEN, MAX_TOKENS,
                           progress=False)
    assert bad["kl"] > 3e-4, bad  # in-format runs: < 1e-4 (about 1e-5)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("flags, needle", [
    (["--target", "gguf:Q2_K", "--group-size", "128"], "stores one scale per 16 columns"),
    (["--target", "gguf:Q2_K", "--bits", "4"], "holds at most 2-bit codes"),
    (["--target", "gguf:TQ2_0", "--bits", "3"], "holds at most 2-bit codes"),
    (["--fallback", "gguf:Q4_0"], "--fallback needs --target"),
    (["--target", "gguf:Q4_K", "--bits-override", "*.down_proj=2"], "cannot be combined"),
    (["--target", "gguf:Q2_K", "--fallback", "gguf:TQ2_0"],
     "model.layers.0.mlp.down_proj: input width 320 fits neither GGUF Q2_K"),
])
def test_bad_targets_are_user_errors(files, capsys, flags, needle):
    out = files["root"] / "bad"
    rc, _ = _quantize(files, out, *TINY_GSQ, "--method", "rtn", *flags)
    err = capsys.readouterr().err
    assert rc == 2 and "gsq: error: " in err and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("value", ["gguf:Q5_9", "exl2:Q2_K", "IQ2_XS"])
def test_unknown_target_types_are_refused_by_the_parser(files, capsys, value):
    with pytest.raises(SystemExit) as exc:
        _quantize(files, files["root"] / "bad", "--target", value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --target" in err and "GGUF target" in err, err
