"""What works per architecture, and the wall time of each step, on tiny random models.

For every architecture case (gsq.models.synthetic layouts, plus linear rope and a Mistral sliding
window): build and save a 2-block model (hidden 64) with SmolLM2's tokenizer, check it as
`gsq quantize` does before loading (plain, and with a GGUF need), quantize it with rtn, gptq and
gsq at a tiny budget (4 + 2 + 4 windows of 32 tokens, 1 epoch of 2 steps, 2 Q/K steps, 2-bit g64),
reload the gsq directory (`load_quantized`), export it as compressed-tensors and load that in
transformers. Reported: each step's wall and CPU seconds, and the largest |logit difference|
against gsq's own dequantized model (`load_quantized`) of the directory read as a plain
transformers checkpoint and of the compressed-tensors checkpoint (0 = exact).
GGUF export itself is not run here.

    python benchmarks/architectures.py [--json benchmarks/results/archs-dense.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gsq.api import quantize
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.export.compressed_tensors import export_compressed_tensors
from gsq.models.loading import peek_architecture
from gsq.models.quantized import load_quantized
from gsq.models.registry import GGUF, check_architecture, support_table
from gsq.models.synthetic import (
    build_random_model,
    demo_tokenizer,
    random_config,
    save_random_model,
)
from gsq.quant.trainer import TrainConfig

ROPE_LINEAR = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
CASES = {
    "llama": ("llama", {}), "llama-tied": ("llama-tied", {}), "llama3": ("llama3", {}),
    "llama-linear": ("llama", ROPE_LINEAR), "llama-yarn": ("llama-yarn", {}),
    "mistral": ("mistral", {}), "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
}
CFG = QuantizeConfig(bits=2, group_size=64, nsamples=4, val_samples=2, gptq_samples=4, seqlen=32,
                     qk_steps=2, train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))


@contextmanager
def timed(row: dict, key: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    row[key] = {"wall_s": round(time.perf_counter() - wall, 3),
                "cpu_s": round(time.process_time() - cpu, 3)}


def _check(source: Path, needs: tuple[str, ...]) -> str:
    try:
        check_architecture(*peek_architecture(source), needs=needs)
        return "ok"
    except GSQError as err:
        return f"refused: {err}"


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def run_case(case: str, tokenizer, calib: Path, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    arch, overrides = CASES[case]
    row: dict = {"case": case}
    with timed(row, "build_save"):
        model = build_random_model(random_config(arch, len(tokenizer), **overrides),
                                   logit_scale=20.0)
        source = save_random_model(model, tokenizer, root / f"{case}-src")
    with timed(row, "check_seconds"):
        row["check"] = _check(source, ())
    row["check_gguf"] = _check(source, (GGUF,))
    if row["check"] != "ok":
        return row
    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(1))
    for method in ("rtn", "gptq", "gsq"):
        out = root / f"{case}-{method}"
        with timed(row, f"quantize_{method}"):
            quantize(str(source), CFG.replace(method=method), calib=str(calib), out=out,
                     progress=False)
    with timed(row, "load_quantized"):
        loaded, _, _ = load_quantized(out)  # gsq's own dequantized model, from the codes
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    row["plain_max_logit_diff"] = _max_diff(plain, loaded, ids)
    with timed(row, "export_ct"):
        export_compressed_tensors(out, root / f"{case}-ct")
    with timed(row, "load_ct"):
        ct = AutoModelForCausalLM.from_pretrained(root / f"{case}-ct", dtype=torch.float32)
    row["ct_max_logit_diff"] = _max_diff(ct.eval(), loaded, ids)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = demo_tokenizer()
    book = Path(__file__).resolve().parents[1] / "src/gsq/data/bundled/pg1342.txt"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsq-archs-") as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(book.read_text(encoding="utf-8")[20_000:40_000])
        for case in args.cases.split(","):
            rows.append(run_case(case, tokenizer, calib, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "support_table": support_table(), "rows": rows,
              "torch_threads": 1}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
