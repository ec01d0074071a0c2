"""GGUF table: gsq files against llama.cpp's own quantizations, every perplexity by llama.cpp.

One row per GGUF file of the base model (SmolLM2-135M-Instruct by default):

  f16            the F16 GGUF of the base written by gsq (`write_base_gguf`): llama.cpp's input
  lc-Q2_K ...    llama.cpp's Q2_K, Q3_K_M, Q4_K_M, Q4_0 of f16 (`quantize_with_llamacpp`)
  lc-Q2_0        llama.cpp's Q2_0 of f16: the tensor types (and size) of gsq-Q2_0+embd
  gsq-Q4_0       `gsq quantize --bits 4 --group-size 32` -> `gsq export --format gguf` (Q4_0)
  gsq-Q2_0       `gsq quantize --bits 2 --group-size 64` -> export (Q2_0)
  gsq-Q2_K ...   `gsq quantize --target gguf:Q2_K|Q3_K|Q4_K` -> export (rows that are not whole
                 256-blocks, i.e. every linear whose input width is 576, use the Q4_0 fallback)
  gsq-*+embd     the same gsq model exported with `--type token_embd=Q8_0` (the tied embedding
                 in Q8_0, as llama.cpp's own files store it; in F16 it alone is ~26 MB more)
  refine-Q2_K .. `gsq refine` of each lc-* file (same size and tensor types as its input)

Columns: tensor types (count per type), file size in MB (10^6 bytes), bpw of the quantized
tensors (bits of the data of the blocks' 2-D linear weights, blk.N.{attn_q,attn_k,attn_v,
attn_output,ffn_gate,ffn_up,ffn_down}.weight, divided by their element count; embeddings and norms
are not counted), ppl by llama.cpp (`gsq eval F.gguf --engine llama.cpp`: WikiText-2 test,
first --max-tokens tokens, windows of --seqlen), ppl by gsq eval (transformers; the quantized
directory for gsq rows, the file itself for +embd, refine and llama.cpp rows, the base model for
f16), their agreement (|llama.cpp - gsq| / gsq, required < 0.5% for gsq exports), the same
again with `gsq eval FILE --numerics llama.cpp` (the file's weights with llama.cpp's 8-bit
activation rounding and fp16 attention; on llama.cpp's own files this is the control that shows
how much of a gap is llama.cpp's arithmetic rather than the export), the same-size-and-types check
of refined files, the nearest-size llama.cpp file and whether the row's ppl beats it, and the wall
seconds of each step (`*` = reused from --work, time of the run that made it).

gsq is driven through its CLI (`python -m gsq.cli ...` in subprocesses, logs in WORK/logs); the
base GGUF and llama.cpp's quantizations go through the library. Rows already in --json with
status "ok" are skipped, so a long table can be built over several calls; intermediate files in
--work are reused. Rows needing a CLI this gsq lacks (`quantize --target`, `refine`) are recorded
as "unsupported by this gsq". llama.cpp runs on --threads CPU threads (default: all cores).

On the GPU machine (1x H100, 16 cores; set-up of wheels, model and data as in
benchmarks/RESULTS.md "How the GPU runs were made", llama-cpp-python from .lcpwhl/), each call:

    bash benchmarks/device_setup.sh
    PYTHONPATH=src:/tmp/site timeout 570 python3 benchmarks/gguf_table.py \\
        --model /root/smollm2.gguf --calib /root/data/calib --text /root/data/wikitext2-test.raw \\
        --device cuda --preset gpu --work /root/gguf_work --json /root/gguf_table.json \\
        --rows ROWS ; cp -r /root/gguf_table.json /root/gguf_work/logs $OUT/

(the `timeout` lets the copy run even when the rows overrun the call), with ROWS split so that
each call stays under 10 min, e.g. (1) `f16 'lc-*'` (2) `gsq-Q4_0
gsq-Q4_0+embd` (3) `gsq-Q2_0 gsq-Q2_0+embd` (4)-(6) one K target and its +embd row each,
(7)-(8) two refine rows each. The machine must stay warm between calls (the work folder and the
JSON live on it); `--list` prints the rows. If a gsq-preset quantization does not fit in one call,
use `--preset cpu` (the budget of benchmarks/RESULTS.md §0) for that row. Then, anywhere:

    python benchmarks/gguf_table.py --json gguf_table.json --table    # print the table only

Faster on the GPU machine: `--stage make` processes (one per list of rows, sharing the GPU) put
their files on a queue that one `--stage llamacpp` process evaluates meanwhile; a last `--stage
all` run assembles the rows from what they made. benchmarks/device_gguf_rows.sh does exactly that
(run detached; see benchmarks/RESULTS.md §8).

Smoke test on a CPU (one block quantized, tiny budget, 2048 tokens, 1 thread, all rows):

    OMP_NUM_THREADS=1 python benchmarks/gguf_table.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gsq.errors import GSQError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BASELINES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0")
K_TARGETS = ("Q2_K", "Q3_K", "Q4_K")
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
AGREEMENT_PCT = 0.5
QUEUE = "llamacpp-queue.txt"  # --stage make appends the files it made, --stage llamacpp reads
QUEUE_CLOSED = "llamacpp-queue.closed"  # made (by the caller) when no more files will come
SMOKE_BUDGET = ("--max-blocks 1 --nsamples 8 --val-samples 2 --gptq-samples 4 --seqlen 128 "
                "--batch-size 2 --micro-batch-size 2 --epochs 4 --qk-steps 2")


class StepError(RuntimeError):
    """A step of a row failed; the message ends with the tail of its log."""


# --------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # base | llamacpp | gsq | embd | refine
    what: str
    ftype: str = ""  # llamacpp / refine: llama.cpp's quantization type
    flags: tuple[str, ...] = ()  # gsq: the `gsq quantize` flags that define the row
    parent: str = ""  # embd: its gsq row; refine: its llama.cpp row
    needs: str = ""  # CLI feature the row needs: "target" | "refine"


def plan_rows() -> list[Row]:
    rows = [Row("f16", "base", "F16 GGUF of the base (gsq), llama.cpp's quantizer input")]
    rows += [Row(f"lc-{t}", "llamacpp", f"llama.cpp {t} of f16", ftype=t) for t in BASELINES]
    rows += [Row("lc-Q2_0", "llamacpp", "llama.cpp Q2_0 of f16 (the types of gsq-Q2_0+embd)",
                 ftype="Q2_0")]
    fresh = [Row("gsq-Q4_0", "gsq", "gsq 4-bit g32 -> Q4_0", flags=("--bits", "4",
                                                                     "--group-size", "32")),
             Row("gsq-Q2_0", "gsq", "gsq 2-bit g64 -> Q2_0", flags=("--bits", "2",
                                                                     "--group-size", "64"))]
    fresh += [Row(f"gsq-{t}", "gsq", f"gsq --target gguf:{t} (fallback Q4_0)",
                  flags=("--target", f"gguf:{t}"), needs="target") for t in K_TARGETS]
    rows += fresh
    rows += [Row(f"{r.name}+embd", "embd", f"{r.name} with token_embd in Q8_0",
                 parent=r.name, needs=r.needs) for r in fresh]
    rows += [Row(f"refine-{t}", "refine", f"gsq refine of lc-{t}", ftype=t, parent=f"lc-{t}",
                 needs="refine") for t in BASELINES]
    return rows


def select_rows(rows: list[Row], patterns: list[str] | None) -> list[Row]:
    if not patterns:
        return rows
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {' '.join(r.name for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


# --------------------------------------------------------------------------------------------
# GGUF facts


def is_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    parts = name.split(".")
    return (len(shape) == 2 and len(parts) == 4 and parts[0] == "blk"
            and parts[2] in BLOCK_LINEARS and parts[3] == "weight")


def file_info(path: Path) -> dict:
    """Size, tensor types and bpw of the block linears of a GGUF file."""
    from gsq.gguf import read_gguf

    _, tensors = read_gguf(path)
    linears = [t for t in tensors if is_block_linear(t.name, t.shape)]
    numel = sum(math.prod(t.shape) for t in linears)
    size = path.stat().st_size
    return {"file": path.name, "file_bytes": size, "size_mb": size / 1e6, "md5": file_md5(path),
            "tensor_types": dict(sorted(Counter(t.type_name for t in tensors).items())),
            "bpw_quantized": 8 * sum(t.data.nbytes for t in linears) / numel if numel else None}


def file_md5(path: Path) -> str:
    """md5 of the file (to show that a file made on two machines is the same)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_layout(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    from gsq.gguf import read_gguf

    return [(t.name, t.type_name, t.shape) for t in read_gguf(path)[1]]


def same_size_and_types(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and tensor_layout(a) == tensor_layout(b)


def check_replaced(src: Path, out: Path, name: str) -> None:
    from gsq.gguf import read_gguf

    before, after = read_gguf(src)[1], read_gguf(out)[1]
    if [t.name for t in before] != [t.name for t in after]:
        raise StepError(f"{out}: tensor list changed")
    for a, b in zip(before, after, strict=True):
        if a.name != name and (a.type_name != b.type_name or not np.array_equal(a.data, b.data)):
            raise StepError(f"{out}: tensor {a.name} changed")


# --------------------------------------------------------------------------------------------
# Running steps


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send file descriptors 1 and 2 (llama.cpp's C logging included) to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def log_tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def child_env(threads: int) -> dict[str, str]:
    """Environment of the gsq CLI subprocesses: this script's gsq first on PYTHONPATH, and
    `threads` torch threads (which is also how many llama.cpp uses in `gsq eval`)."""
    import gsq

    env = dict(os.environ)
    src = str(Path(gsq.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class Steps:
    """Runs the steps of rows; each step makes one output in --work, reused if present (its
    wall seconds are kept in WORK/steps.json)."""

    def __init__(self, work: Path, threads: int) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = child_env(threads)
        self.threads = threads
        # one times file per process: several processes (--stage) may share the work folder
        self.times = {}
        for known in sorted(work.glob("steps*.json")):
            self.times.update(json.loads(known.read_text()))
        self.times_file = work / f"steps-{os.getpid()}.json"
        self._help: dict[str, str] = {}

    def run(self, record: dict, step: str, out: Path, make: Callable[[Path], None]) -> Path:
        """Make `out` with make(log) unless it exists; note the seconds in record["seconds"]."""
        key = str(out.resolve())
        if out.exists():
            record["seconds"].setdefault(step, f"{self.times.get(key, 0):.0f}*")
            return out
        log = self.logs / f"{out.name}.log"
        print(f"  {step}: {out.name} ...", flush=True)
        t0 = time.perf_counter()
        make(log)
        seconds = time.perf_counter() - t0
        if not out.exists():
            raise StepError(f"{step} made no {out} ({log_tail(log)})")
        self.times[key] = seconds
        self.times_file.write_text(json.dumps(self.times, indent=1))
        record["seconds"][step] = f"{seconds:.0f}"
        return out

    def cli(self, record: dict, argv: list[str], log: Path, quiet: bool = False) -> None:
        """`python -m gsq.cli [-q] ARGV`, output to `log`; StepError on a non-zero exit."""
        cmd = [sys.executable, "-m", "gsq.cli", *(["-q"] if quiet else []), *argv]
        record["commands"].append(shlex.join(["gsq", *argv]))
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                  check=False)
        if proc.returncode:
            raise StepError(f"`gsq {argv[0]}` exit {proc.returncode}: {log_tail(log)}")

    def supports(self, feature: str) -> bool:
        """Whether this gsq's CLI has `quantize --target` / `refine`."""
        sub, flag = {"target": ("quantize", "--target"), "refine": ("refine", "--base")}[feature]
        if sub not in self._help:
            proc = subprocess.run([sys.executable, "-m", "gsq.cli", sub, "-h"], env=self.env,
                                  capture_output=True, text=True, check=False)
            self._help[sub] = proc.stdout if proc.returncode == 0 else ""
        return flag in self._help[sub]


# --------------------------------------------------------------------------------------------
# The table's files


class Table:
    """Makes and measures the rows (args: the parsed command line)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.steps = Steps(self.work, args.threads)
        self.tag = args.preset + (f".{hashlib.sha1(args.budget.encode()).hexdigest()[:6]}"
                                  if args.budget else "")
        self.rows = {r.name: r for r in plan_rows()}
        self.earlier = (json.loads(Path(args.llamacpp_from).read_text())["rows"]
                        if args.llamacpp_from else {})

    # files ------------------------------------------------------------------------------------

    def base_gguf(self, rec: dict) -> Path:
        from gsq.export.gguf_file import write_base_gguf

        def make(log: Path) -> None:
            with output_to(log):
                write_base_gguf(self.args.model, out, "F16")

        out = self.work / "base-F16.gguf"
        return self.steps.run(rec, "base", out, make)

    def llamacpp_gguf(self, rec: dict, ftype: str) -> Path:
        from gsq.eval.llamacpp import quantize_with_llamacpp

        base = self.base_gguf(rec)

        def make(log: Path) -> None:
            with output_to(log):
                quantize_with_llamacpp(base, out, ftype, nthread=self.args.threads)

        out = self.work / f"lc-{ftype}.gguf"
        return self.steps.run(rec, "lc-quantize", out, make)

    def gsq_dir(self, rec: dict, row: Row) -> Path:
        out = self.work / f"{row.name}.{self.tag}"
        argv = ["quantize", self.args.model, "--method", "gsq", *row.flags,
                "--preset", self.args.preset, "--calib", self.args.calib,
                "--device", self.args.device, "--seed", str(self.args.seed),
                *shlex.split(self.args.budget), "--out", str(out)]
        return self.steps.run(rec, "quantize", out, lambda log: self.steps.cli(rec, argv, log))

    def gsq_gguf(self, rec: dict, row: Row) -> Path:
        qdir = self.gsq_dir(rec, row)
        out = self.work / f"{qdir.name}.gguf"
        argv = ["export", str(qdir), "--format", "gguf", "--out", str(out)]
        return self.steps.run(rec, "export", out, lambda log: self.steps.cli(rec, argv, log))

    def embd_gguf(self, rec: dict, row: Row) -> Path:
        qdir = self.gsq_dir(rec, self.rows[row.parent])
        out = self.work / f"{qdir.name}+embd.gguf"
        argv = ["export", str(qdir), "--format", "gguf", "--type", "token_embd=Q8_0",
                "--out", str(out)]
        return self.steps.run(rec, "embd", out, lambda log: self.steps.cli(rec, argv, log))

    def refined_gguf(self, rec: dict, row: Row) -> Path:
        src = self.llamacpp_gguf(rec, row.ftype)
        out = self.work / f"{row.name}.{self.tag}.gguf"
        argv = ["refine", str(src), "--base", self.args.model, "--calib", self.args.calib,
                "--preset", self.args.preset, "--device", self.args.device,
                "--seed", str(self.args.seed), *shlex.split(self.args.budget)]
        if row.ftype.startswith("Q2_K") and self.args.refine_scales != "frozen":
            argv += ["--scales", self.args.refine_scales]
        argv += ["--out", str(out)]
        return self.steps.run(rec, "refine", out, lambda log: self.steps.cli(rec, argv, log))

    # evaluations ------------------------------------------------------------------------------

    def evaluate(self, rec: dict, model: Path | str, engine: str, numerics: str = "exact"
                 ) -> dict:
        """`gsq eval` of a file or directory, by llama.cpp or by transformers (cached); with
        numerics "llama.cpp", transformers computes as llama.cpp's CPU backend would."""
        a = self.args
        stem = Path(model).name if Path(model).exists() else Path(str(model)).name
        label = "llamacpp" if engine == "llama.cpp" else "gsq" if numerics == "exact" else "gsqlc"
        out = self.work / "eval" / f"{stem}.{label}.s{a.seqlen}.t{a.max_tokens}.json"
        out.parent.mkdir(exist_ok=True)
        argv = ["eval", str(model), "--engine", engine, "--text", a.text,
                "--seqlen", str(a.seqlen), "--max-tokens", str(a.max_tokens), "--json", str(out)]
        if engine != "llama.cpp":
            argv += ["--device", a.device, "--numerics", numerics]
        if out.exists() and Path(model).exists() and Path(model).stat().st_mtime > \
                out.stat().st_mtime:
            out.unlink()  # the file was made again since it was evaluated
        step = {"llamacpp": "eval-lc", "gsq": "eval-gsq", "gsqlc": "eval-gsq-lcnum"}[label]
        self.steps.run(rec, step, out, lambda log: self.steps.cli(rec, argv, log, quiet=True))
        return json.loads(out.read_text())

    def measure(self, rec: dict, gguf: Path, reference: Path | str | None) -> None:
        """File facts, llama.cpp's ppl and (with `reference`) gsq's ppl and their agreement.
        In --stage make, llama.cpp's evaluation is left to --stage llamacpp: the file goes on
        the queue."""
        rec.update(file_info(gguf))
        ref = self.evaluate(rec, reference, "transformers") if reference is not None else None
        if ref is not None:
            rec.update(ppl_gsq=ref["ppl"], tokens_gsq=ref["tokens"])
        num = self.evaluate(rec, gguf, "transformers", "llama.cpp") if self.args.numerics \
            else None
        if num is not None:
            rec["ppl_gsq_lcnum"] = num["ppl"]
        if self.args.stage == "make":
            if rec["kind"] != "llamacpp":
                with open(self.work / QUEUE, "a") as fh:
                    fh.write(f"{gguf}\n")
            return
        lc = self.earlier_llamacpp(rec) or self.evaluate(rec, gguf, "llama.cpp")
        rec.update(ppl_llamacpp=lc["ppl"], tokens_llamacpp=lc["tokens"])
        if num is not None:
            rec["agreement_lcnum_pct"] = 100 * abs(lc["ppl"] - num["ppl"]) / num["ppl"]
        if ref is None:
            return
        rec["agreement_pct"] = 100 * abs(lc["ppl"] - ref["ppl"]) / ref["ppl"]
        if lc["tokens"] != ref["tokens"]:
            rec["notes"].append(f"token counts differ: llama.cpp {lc['tokens']}, "
                                f"gsq {ref['tokens']}")

    def earlier_llamacpp(self, rec: dict) -> dict | None:
        """llama.cpp's result for a file of the same md5 in --llamacpp-from, if there is one
        (llama.cpp is not run again on a byte-identical file)."""
        for old in self.earlier.values():
            if old.get("md5") == rec["md5"] and old.get("ppl_llamacpp") is not None:
                rec["notes"].append(f"llama.cpp ppl of the same file (md5) from "
                                    f"{Path(self.args.llamacpp_from).name}, "
                                    f"{old.get('machine', 'earlier run')}")
                return {"ppl": old["ppl_llamacpp"], "tokens": old["tokens_llamacpp"]}
        return None

    # rows -------------------------------------------------------------------------------------

    def run_row(self, row: Row) -> dict:
        rec = {"name": row.name, "kind": row.kind, "what": row.what, "status": "running",
               "seconds": {}, "commands": [], "notes": [], "preset": self.args.preset,
               "budget": self.args.budget, "calib": self.args.calib, "device": self.args.device}
        if row.needs and not self.steps.supports(row.needs):
            missing = "quantize --target" if row.needs == "target" else "refine"
            rec["status"] = f"unsupported by this gsq (no `gsq {missing}`)"
            return rec
        try:
            self.measure_row(rec, row)
            rec["status"] = "made" if self.args.stage == "make" else "ok"
        except (StepError, GSQError, OSError, ValueError, RuntimeError) as err:
            rec["status"] = f"error: {err}"
        return rec

    def measure_row(self, rec: dict, row: Row) -> None:
        if row.kind == "base":
            self.measure(rec, self.base_gguf(rec), self.args.model)
        elif row.kind == "llamacpp":  # control: transformers reading llama.cpp's own file
            gguf = self.llamacpp_gguf(rec, row.ftype)
            self.measure(rec, gguf, gguf)
        elif row.kind == "gsq":
            gguf = self.gsq_gguf(rec, row)
            self.measure(rec, gguf, self.gsq_dir(rec, row))
            report = json.loads((self.gsq_dir(rec, row) / "report.json").read_text())
            rec["quantize"] = {k: report.get(k) for k in ("bpp", "blocks_quantized",
                                                          "blocks_total", "fallback")}
        elif row.kind == "embd":
            self.measure_embd(rec, row)
        else:
            self.measure_refined(rec, row)

    def measure_embd(self, rec: dict, row: Row) -> None:
        """The +embd file against gsq eval of the same file and, beside it, gsq eval of the
        quantized directory (F16 embedding)."""
        gguf = self.embd_gguf(rec, row)
        self.measure(rec, gguf, gguf)
        qdir = self.evaluate(rec, self.gsq_dir(rec, self.rows[row.parent]), "transformers")
        rec["ppl_gsq_qdir"] = qdir["ppl"]

    def measure_refined(self, rec: dict, row: Row) -> None:
        src, out = self.llamacpp_gguf(rec, row.ftype), self.refined_gguf(rec, row)
        self.measure(rec, out, out)
        rec["input"] = src.name
        rec["same_size_and_types"] = same_size_and_types(src, out)
        report = Path(f"{out}.refine.json")
        if report.exists():
            r = json.loads(report.read_text())
            rec["refine"] = {k: r.get(k) for k in ("changed_fraction", "refined_types",
                                                   "passthrough_types", "blocks_refined",
                                                   "blocks_total", "heldout")}


# --------------------------------------------------------------------------------------------
# Results file and table


def protocol(args: argparse.Namespace) -> dict:
    return {"model": args.model, "text": args.text, "seqlen": args.seqlen,
            "max_tokens": args.max_tokens}


def load_results(path: Path, args: argparse.Namespace) -> dict:
    if not path.exists():
        return {"protocol": protocol(args), "runs": [], "rows": {}}
    data = json.loads(path.read_text())
    if data["protocol"] != protocol(args) and not args.table:
        raise SystemExit(f"{path} holds rows measured with {data['protocol']}, not "
                         f"{protocol(args)}; use another --json")
    return data


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_meta(args: argparse.Namespace) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv), "commit": commit, "gpu": gpu,
            "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
            "torch": torch.__version__, "llama_cpp": _llama_cpp_version()}


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _types(types: dict | None) -> str:
    return " ".join(f"{t}:{n}" for t, n in sorted((types or {}).items(), key=lambda x: -x[1]))


def versus(rec: dict, rows: dict) -> str:
    """The llama.cpp file this row should beat (its input for refine rows, else the nearest in
    size) and the ppl change against it."""
    if rec["kind"] not in ("gsq", "embd", "refine") or rec.get("ppl_llamacpp") is None:
        return ""
    pool = [r for r in rows.values() if r["kind"] == "llamacpp" and r.get("ppl_llamacpp")]
    if rec["kind"] == "refine":
        pool = [r for r in pool if r.get("file") == rec.get("input")]
    if not pool:
        return "-"
    ref = min(pool, key=lambda r: abs(math.log(r["file_bytes"] / rec["file_bytes"])))
    size = 100 * (rec["file_bytes"] / ref["file_bytes"] - 1)
    ppl = 100 * (rec["ppl_llamacpp"] / ref["ppl_llamacpp"] - 1)
    verdict = "beats" if ppl < 0 else "ties" if ppl == 0 else "loses to"
    return f"{verdict} {ref['name']} (size {size:+.1f}%, ppl {ppl:+.2f}%)"


def check_cell(rec: dict) -> str:
    if rec["kind"] != "refine" or "same_size_and_types" not in rec:
        return ""
    cell = "yes" if rec["same_size_and_types"] else "**NO**"
    changed = (rec.get("refine") or {}).get("changed_fraction")
    return cell if changed is None else f"{cell} ({100 * changed:.2f}% codes changed)"


def agree_cell(rec: dict, key: str = "agreement_pct") -> str:
    pct = rec.get(key)
    if pct is None:
        return "-"
    flag = "" if pct < AGREEMENT_PCT else " **>0.5%**"
    return f"{pct:.3f}{flag}"


def format_table(rows: dict, order: list[str]) -> str:
    head = ("| row | file | tensor types | size MB | bpw (blk linears) | ppl llama.cpp | "
            "ppl gsq eval | agree % | ppl gsq eval, llama.cpp numerics | agree % | "
            "same size+types | vs llama.cpp | wall s |")
    lines = [head, "|" + "---|" * 13]
    for name in [n for n in order if n in rows]:
        r = rows[name]
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status'][:160]} |" + " |" * 11)
            continue
        wall = " ".join(f"{k}={v}" for k, v in r["seconds"].items())
        lines.append(
            f"| {name} | {r['file']} | {_types(r['tensor_types'])} | {r['size_mb']:.2f} | "
            f"{_num(r['bpw_quantized'], '.3f')} | {_num(r.get('ppl_llamacpp'), '.3f')} | "
            f"{_num(r.get('ppl_gsq'), '.3f')} | {agree_cell(r)} | "
            f"{_num(r.get('ppl_gsq_lcnum'), '.3f')} | {agree_cell(r, 'agreement_lcnum_pct')} | "
            f"{check_cell(r)} | "
            f"{versus(r, rows)} | {wall} |")
    return "\n".join(lines)


def summary(rows: dict) -> str:
    """The issue's requirements and target, over the rows measured so far."""
    made = [r for r in rows.values() if r["kind"] in ("gsq", "embd", "refine")]
    ok = [r for r in made if r["status"] == "ok"]
    far = [r["name"] for r in ok if r.get("agreement_pct", 0) >= AGREEMENT_PCT]
    far_num = [r["name"] for r in ok if r.get("agreement_lcnum_pct", 0) >= AGREEMENT_PCT]
    bad = [r["name"] for r in ok if r["kind"] == "refine" and not r["same_size_and_types"]]
    lose = [r["name"] for r in ok if not versus(r, rows).startswith("beats")]
    return "\n".join([
        f"gsq files that load and run in llama.cpp: {len(ok)}/{len(made)} "
        f"(not: {', '.join(r['name'] for r in made if r not in ok) or 'none'})",
        f"gsq exports off gsq eval by >= {AGREEMENT_PCT}%: {', '.join(far) or 'none'}",
        f"... off gsq eval with llama.cpp numerics by >= {AGREEMENT_PCT}%: "
        f"{', '.join(far_num) or 'none'}",
        f"refined files not of their input's size and types: {', '.join(bad) or 'none'}",
        f"gsq files that do not beat their llama.cpp file: {', '.join(lose) or 'none'}"])


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", default="smollm2-demo",
                   help="base model: 'smollm2-demo', a .gguf, HF id or folder")
    p.add_argument("--calib", default=None, help="calibration text file or folder "
                   "(default: shared/data/calib; --smoke: one book of it)")
    p.add_argument("--text", default=str(SHARED / "wikitext2-test.raw"))
    p.add_argument("--work", default=None,
                   help="intermediate files, reused if present (default runs/gguf_table[_smoke])")
    p.add_argument("--json", default=None,
                   help="results, written after each row (default WORK/gguf_table.json)")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="names or fnmatch patterns (default: all; see --list)")
    p.add_argument("--redo", action="store_true", help="measure rows already in --json again")
    p.add_argument("--preset", choices=("cpu", "gpu", "paper"), default="gpu")
    p.add_argument("--budget", default="",
                   help="extra flags for `gsq quantize` and `gsq refine`, e.g. '--epochs 4'")
    p.add_argument("--refine-scales", choices=("frozen", "train"), default="frozen",
                   help="`gsq refine --scales` for Q2_K files")
    p.add_argument("--device", default=None, help="gsq's device (default cuda; --smoke: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluation tokens (default 65536; --smoke: 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of llama.cpp and torch (default all cores; --smoke: 1)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run: first block only, tiny budget, 2048 tokens, 1 thread")
    p.add_argument("--stage", choices=("all", "make", "llamacpp"), default="all",
                   help="make: every step but llama.cpp's evaluations, whose files go on "
                        f"WORK/{QUEUE}; llamacpp: evaluate the queued files as they come, until "
                        f"WORK/{QUEUE_CLOSED} exists; all: everything (reusing what the stages "
                        "made). Lets one GPU process per row set and one llama.cpp process run "
                        "side by side")
    p.add_argument("--llamacpp-from", default=None, metavar="JSON",
                   help="take llama.cpp's ppl of a file from this earlier results file when it "
                        "holds a row with the same md5 (noted in the row) instead of running it")
    p.add_argument("--lc-files", default="*", metavar="GLOB",
                   help="--stage llamacpp: evaluate only queued files whose name matches")
    p.add_argument("--no-numerics", dest="numerics", action="store_false",
                   help="skip `gsq eval --numerics llama.cpp` of each file (by default every "
                        "file is also evaluated that way, beside the agreement column)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--table", action="store_true", help="print the table of --json and exit")
    return apply_defaults(p.parse_args(argv))


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    root = Path(__file__).resolve().parents[1] / "runs"
    args.work = args.work or str(root / ("gguf_table_smoke" if smoke else "gguf_table"))
    args.json = args.json or str(Path(args.work) / "gguf_table.json")
    args.calib = args.calib or str(SHARED / "calib" / ("pg2641.txt" if smoke else ""))
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.max_tokens = args.max_tokens or (2048 if smoke else 65536)
    args.threads = args.threads or (1 if smoke else os.cpu_count() or 1)
    if smoke:
        args.preset = "cpu"
        args.budget = f"{SMOKE_BUDGET} {args.budget}".strip()
    return args


def claim(path: Path) -> bool:
    """Create `path` if no one has: True for the one process that did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def follow_queue(table: Table, poll_seconds: float = 5.0) -> None:
    """--stage llamacpp: llama.cpp's perplexity of each file on WORK/QUEUE, in queue order, as
    the make stages add them; ends when WORK/QUEUE_CLOSED exists and every file is done. Several
    such processes share the queue (each file is claimed by one)."""
    queue, closed, done = table.work / QUEUE, table.work / QUEUE_CLOSED, set()
    while True:
        is_closed = closed.exists()  # read before the queue: a file queued before closing counts
        paths = queue.read_text().split() if queue.exists() else []
        todo = [p for p in paths if p not in done]
        for path in todo:
            done.add(path)
            if not fnmatch.fnmatch(Path(path).name, table.args.lc_files):
                continue
            if not claim(table.work / "eval" / f"{Path(path).name}.claim"):
                continue  # another --stage llamacpp process has it
            rec = {"seconds": {}, "commands": []}
            print(f"llama.cpp: {Path(path).name} ...", flush=True)
            try:
                ppl = table.evaluate(rec, Path(path), "llama.cpp")["ppl"]
                print(f"  ppl {ppl:.3f} ({rec['seconds'].get('eval-lc')} s)", flush=True)
            except (StepError, GSQError, OSError) as err:
                print(f"  error: {err}", flush=True)
        if not todo:
            if is_closed:
                return
            time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = plan_rows()
    if args.list:
        for r in rows:
            print(f"{r.name:16} {r.what}")
        return
    path = Path(args.json)
    data = load_results(path, args)
    order = [r.name for r in rows]
    if args.table:
        print(format_table(data["rows"], order))
        print(summary(data["rows"]))
        return
    import torch

    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    table = Table(args)
    if args.stage == "llamacpp":
        follow_queue(table)
        return
    data["runs"].append(run_meta(args))
    for row in select_rows(rows, args.rows):
        old = data["rows"].get(row.name)
        if old and old["status"] == "ok" and not args.redo:
            print(f"{row.name}: in {path}, skipped", flush=True)
            continue
        print(f"{row.name}: {row.what}", flush=True)
        data["rows"][row.name] = table.run_row(row)
        print(f"  {data['rows'][row.name]['status']}", flush=True)
        save_results(path, data)
    save_results(path, data)
    print(format_table(data["rows"], order))
    print(summary(data["rows"]))


if __name__ == "__main__":
    main()
