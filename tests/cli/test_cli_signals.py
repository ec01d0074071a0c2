"""SIGTERM during a command unwinds like Ctrl-C: temporary outputs are removed, exit 130."""

import os
import signal

from gsq.cli import __main__ as cli
from gsq.io.quantized_dir import atomic_output_dir


def test_sigterm_removes_the_temporary_output_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"

    def fake_quantize(args):
        with atomic_output_dir(out) as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(cli, "cmd_quantize", fake_quantize)
    previous = signal.getsignal(signal.SIGTERM)
    code = cli.main(["quantize", "smollm2-demo", "--out", str(out)])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a .tmp folder
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


def test_autocast_flag_reaches_the_training_config():
    args = cli.build_parser().parse_args(
        ["quantize", "smollm2-demo", "--autocast", "bf16", "--out", "x"])
    assert cli.build_config(args).train.autocast == "bf16"
    args = cli.build_parser().parse_args(["quantize", "smollm2-demo", "--out", "x"])
    assert cli.build_config(args).train.autocast is None
