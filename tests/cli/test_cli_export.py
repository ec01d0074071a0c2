"""`gsq export` and `gsq eval --engine llama.cpp` end to end on a tiny random Llama.

The user's path: `gsq quantize --method rtn` -> `gsq export --format gguf` -> `gsq eval` of the
.gguf file through llama.cpp. Every user error ends as exit status 2 with one `gsq: error: ...` line
and leaves nothing at --out. Tests that run llama.cpp fail (not skip) without llama-cpp-python.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import types
from pathlib import Path

import pytest

from gsq.cli.__main__ import main
from gsq.gguf import read_gguf

_WORD_LIST = ("the of and to in is was that for on with as by at from it his her an be had not "
              "are which this were have or one all their they but said been would there who more "
              "12 1999 don't it's")
WORDS = _WORD_LIST.split()
QUANTIZE = ["--method", "rtn", "--bits", "2", "--group-size", "64", "--bits-override",
            "*.self_attn.*=4", "--nsamples", "4", "--val-samples", "1", "--gptq-samples", "2",
            "--seqlen", "32"]


def _text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append(rng.choice(WORDS))
    return " ".join(words) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama, build_byte_bpe_tokenizer) -> dict[str, Path]:
    """A tiny HF Llama, calibration and evaluation text, and its `gsq quantize` directory
    (2-bit g64 MLPs, 4-bit g64 attention, RTN)."""
    root = tmp_path_factory.mktemp("cli-export")
    tokenizer = build_byte_bpe_tokenizer()
    tiny_llama(0, vocab_size=len(tokenizer)).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    (root / "calib.txt").write_text(_text(6000, 0))
    (root / "eval.txt").write_text(_text(3000, 1))
    argv = ["-q", "quantize", str(root / "hf"), "--calib", str(root / "calib.txt"), "--out",
            str(root / "q"), *QUANTIZE]
    assert main(argv) == 0
    return {"hf": root / "hf", "q": root / "q", "calib": root / "calib.txt",
            "eval": root / "eval.txt", "root": root}


@pytest.fixture(scope="module")
def gguf_path(files) -> Path:
    out = files["root"] / "q.gguf"
    assert main(["-q", "export", str(files["q"]), "--format", "gguf", "--out", str(out)]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("gsq: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def _assert_user_error(capsys, argv, out: Path | None, *needles: str) -> str:
    assert main(argv) == 2
    line = _error_line(capsys)
    for needle in needles:
        assert needle in line, line
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    return line


def _eval(capsys, model: Path, text: Path, *extra: str) -> dict:
    assert main(["-q", "eval", str(model), "--text", str(text), "--seqlen", "64", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.type_name for t in read_gguf(path)[1]}


# --------------------------------------------------------------------------------------------
# Working paths


def test_export_gguf_prints_a_summary(capsys, files, tmp_path):
    out = tmp_path / "model.gguf"
    assert main(["export", str(files["q"]), "--format", "gguf", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("exported 21 tensors (") and line.endswith(f"-> {out}")
    assert "Q2_0" in line and "Q4_0" in line and "bpw in quantized tensors" in line
    types = _types(out)
    assert types["blk.0.ffn_down.weight"] == "Q2_0" and types["blk.1.attn_q.weight"] == "Q4_0"


def test_eval_gguf_through_llamacpp_matches_gsq(capsys, llama_cpp, files, gguf_path):
    """Same windows and tokens: llama.cpp on the .gguf agrees with transformers on the gsq
    directory; `--engine auto` runs the file's Q2_0 tensors in transformers (gsq decodes them),
    and agrees too."""
    theirs = _eval(capsys, gguf_path, files["eval"], "--engine", "llama.cpp")
    ours = _eval(capsys, files["q"], files["eval"])
    assert (theirs["tokens"], theirs["windows"]) == (ours["tokens"], ours["windows"])
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-3)
    auto = _eval(capsys, gguf_path, files["eval"])
    assert auto == _eval(capsys, gguf_path, files["eval"], "--engine", "transformers")
    assert (auto["tokens"], auto["windows"]) == (ours["tokens"], ours["windows"])
    assert auto["ppl"] == pytest.approx(ours["ppl"], rel=1e-3)
    assert auto["ppl"] == pytest.approx(theirs["ppl"], rel=1e-3)


def test_eval_with_llamacpp_numerics(capsys, llama_cpp, files, gguf_path):
    """`--numerics llama.cpp` rounds activations (here Q8_0 for the Q2_0 linears) and attention
    to fp16: a different, close perplexity on the same windows; with --base, only the model is
    emulated."""
    exact = _eval(capsys, gguf_path, files["eval"])
    emulated = _eval(capsys, gguf_path, files["eval"], "--numerics", "llama.cpp")
    assert (emulated["tokens"], emulated["windows"]) == (exact["tokens"], exact["windows"])
    assert emulated["ppl"] != exact["ppl"]
    assert emulated["ppl"] == pytest.approx(exact["ppl"], rel=2e-2)
    versus = _eval(capsys, gguf_path, files["eval"], "--numerics", "llama.cpp", "--base",
                   str(files["q"]))
    assert versus["ppl"] == pytest.approx(emulated["ppl"], rel=1e-6)  # the base runs exact
    assert versus["base_ppl"] == pytest.approx(_eval(capsys, files["q"], files["eval"])["ppl"],
                                               rel=1e-6)


def test_eval_gguf_against_the_gsq_directory(capsys, llama_cpp, files, gguf_path, tmp_path):
    result = _eval(capsys, gguf_path, files["eval"], "--engine", "llama.cpp", "--base",
                   str(files["q"]), "--tokenizer", str(files["q"]), "--json",
                   str(tmp_path / "r.json"))
    assert result["kl"] < 1e-4 and result["top1"] > 0.97, result
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_eval_gguf_against_itself_as_gguf_base(capsys, llama_cpp, files, gguf_path):
    result = _eval(capsys, gguf_path, files["eval"], "--engine", "llama.cpp", "--base",
                   str(gguf_path))
    assert result["kl"] == pytest.approx(0, abs=1e-9) and result["top1"] == 1.0
    assert result["ppl"] == result["base_ppl"]


def test_type_overrides_and_float_type(capsys, files, tmp_path):
    out = tmp_path / "o.gguf"
    assert main(["-q", "export", str(files["q"]), "--format", "gguf", "--out", str(out),
                 "--type", "*.mlp.*=q8_0", "--type", "output=F32", "--float-type", "BF16"]) == 0
    types = _types(out)
    assert {types[f"blk.{i}.ffn_{n}.weight"] for i in (0, 1) for n in ("gate", "up", "down")} \
        == {"Q8_0"}
    assert types["output.weight"] == "F32" and types["token_embd.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_lossy_rounds_what_a_type_cannot_hold(capsys, files, tmp_path):
    out = tmp_path / "l.gguf"
    argv = ["export", str(files["q"]), "--format", "gguf", "--out", str(out), "--type",
            "*.q_proj=Q2_0"]
    _assert_user_error(capsys, argv, out, "q_proj", "Q2_0", "--lossy")
    assert main([*argv, "--lossy"]) == 0
    assert "2 rounded (--lossy)" in capsys.readouterr().out
    assert _types(out)["blk.0.attn_q.weight"] == "Q2_0"


def test_overwrite(capsys, files, gguf_path, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("old")
    argv = ["-q", "export", str(files["q"]), "--format", "gguf", "--out", str(out)]
    _assert_user_error(capsys, argv, None, "already exists", "--overwrite")
    assert out.read_text() == "old"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_bytes() == gguf_path.read_bytes()


def test_compressed_tensors_is_dispatched(capsys, files, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("gsq.export.compressed_tensors")
    fake.export_compressed_tensors = lambda qdir, out, **kw: calls.append((qdir, out, kw)) or {}
    monkeypatch.setitem(sys.modules, "gsq.export.compressed_tensors", fake)
    out = tmp_path / "ct"
    assert main(["export", str(files["q"]), "--format", "compressed-tensors", "--out", str(out),
                 "--container-bits", "4", "--overwrite"]) == 0
    assert calls == [(str(files["q"]), str(out), {"container_bits": 4, "overwrite": True})]
    assert f"-> {out}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize("flags, needle", [
    (["--format", "gguf", "--container-bits", "4"], "--container-bits applies to"),
    (["--format", "compressed-tensors", "--lossy"], "--lossy: for --format gguf only"),
    (["--format", "compressed-tensors", "--type", "*=Q4_0"], "--type: for --format gguf only"),
    (["--format", "gguf", "--type", "*.q_proj=Q4_K"], "Q4_K"),  # rows of 64: no 256-blocks
    (["--format", "gguf", "--type", "*.nothing=Q4_0"], "matches no tensor"),
    (["--format", "gguf", "--type", "*.q_proj=Q7_7"], "GGUF type must be one of"),
    (["--format", "gguf", "--type", "model.embed_tokens=Q2_K"], "not quantized by gsq"),
])
def test_bad_export_flags(capsys, files, tmp_path, flags, needle):
    out = tmp_path / "x.gguf"
    _assert_user_error(capsys, ["export", str(files["q"]), "--out", str(out), *flags], out, needle)


@pytest.mark.parametrize("flags", [["--type", "no-equals-sign"], ["--format", "onnx"],
                                   ["--float-type", "Q4_0"]])
def test_export_argparse_errors(capsys, files, tmp_path, flags):
    argv = ["export", str(files["q"]), "--out", str(tmp_path / "x"), "--format", "gguf", *flags]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_export_of_a_plain_model_folder(capsys, files, tmp_path):
    out = tmp_path / "x.gguf"
    _assert_user_error(capsys, ["export", str(files["hf"]), "--format", "gguf", "--out", str(out)],
                       out, "not a gsq quantized directory")


def test_export_refuses_a_tokenizer_it_cannot_convert(capsys, files, byte_tokenizer, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(files["q"], copy)
    byte_tokenizer.save_pretrained(copy)  # byte-level BPE without merges
    out = tmp_path / "x.gguf"
    _assert_user_error(capsys, ["export", str(copy), "--format", "gguf", "--out", str(out)],
                       out, "no BPE merges")


def test_export_refuses_an_unsupported_architecture(capsys, files, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(files["q"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    out = tmp_path / "x.gguf"
    _assert_user_error(capsys, ["export", str(copy), "--format", "gguf", "--out", str(out)],
                       out, "model types llama", "'gemma'")


@pytest.mark.parametrize("engine", ["llama.cpp", "auto"])
def test_eval_of_a_truncated_gguf(capsys, llama_cpp, files, gguf_path, tmp_path, engine):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_path.read_bytes()[:5000])
    _assert_user_error(capsys, ["eval", str(broken), "--text", str(files["eval"]), "--engine",
                                engine], None, "cannot read GGUF file", str(broken))


def test_eval_engine_llamacpp_needs_a_gguf_file(capsys, files):
    _assert_user_error(capsys, ["eval", str(files["q"]), "--text", str(files["eval"]),
                                "--engine", "llama.cpp"], None, "needs a .gguf model file")


def test_eval_numerics_needs_a_gguf_file_and_the_transformers_engine(capsys, files, gguf_path):
    _assert_user_error(capsys, ["eval", str(files["q"]), "--text", str(files["eval"]),
                                "--numerics", "llama.cpp"], None, "needs a .gguf model")
    _assert_user_error(capsys, ["eval", str(gguf_path), "--text", str(files["eval"]),
                                "--numerics", "llama.cpp", "--engine", "llama.cpp"], None,
                       "transformers engine only")


def test_eval_tokenizer_flag_is_for_llamacpp_only(capsys, files):
    _assert_user_error(capsys, ["eval", str(files["q"]), "--text", str(files["eval"]),
                                "--tokenizer", str(files["hf"])], None, "llama.cpp engine only")
