"""The partial directory of a quantize run, `OUT.partial/`: the output built block by block, and
what a killed run needs to resume.

Layout:
  run.json         format, the run's fingerprint (config, inputs, versions), blocks finished, the
                   inputs of the next block (file, shape), per-block report entries and module
                   metadata; replaced atomically after each block, so it always describes a
                   consistent state
  out/             the future OUT: one safetensors shard per block (`model-00004-of-00031...`)
                   written as each block finishes; the other shards, index, config, tokenizer,
                   codes, gsq_config.json and report.json when the run completes
  codes/           the codes and scales of each finished block (`block-00003.safetensors`)
  act/             the hidden states entering the next block, raw fp32 (`in-00004-train.f32`),
                   and `spill/`, the memory-mapped activation files of a run over its host budget

A block counts as finished once run.json says so; anything of a later block (a shard or codes
written before a kill) is overwritten when that block is redone. When the block loop is over,
`out/` is completed (`complete`: run.json then says `completed`); stages that run on the whole
finished directory (the end-to-end scale stage) work on it there, and a resumed run whose block
loop had completed goes straight to them. Then `out/` is renamed to OUT and the partial directory
removed (`publish`): nothing appears at OUT before that. A lock file keeps two runs from sharing
a partial directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from gsq.errors import GSQError
from gsq.io.quantized_dir import CODES_FILE, FORMAT_NAME, FORMAT_VERSION, META_FILE, REPORT_FILE
from gsq.io.shards import TensorEntry, entries_of, file_entries, write_index, write_safetensors

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "gsq-partial"
PARTIAL_VERSION = 1
STATE_FILE = "run.json"
LOCK_FILE = ".lock"
SPLITS = ("train", "val", "gptq")


def activation_folder(partial: Path) -> Path:
    """The activation folder of the partial directory `partial` (spill files, next inputs)."""
    return partial / "act"


def partial_path(out: str | Path) -> Path:
    """`OUT.partial` beside OUT."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class PartialRun:
    """A partial directory opened for one run (see the module docstring)."""

    def __init__(self, path: Path, state: dict, lock_fd: int) -> None:
        self.path = path
        self.state = state
        self._lock_fd = lock_fd

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, out: str | Path, fingerprint: dict, blocks_total: int, resume: bool,
             overwrite: bool) -> PartialRun:
        """Start a partial run for OUT, or continue the one there (`resume`).

        GSQError if a partial run exists and neither `resume` nor `overwrite` is given, or if
        `resume` finds one whose fingerprint differs (the reason in one line)."""
        path = partial_path(out)
        fingerprint = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
        state = cls._read_state(path) if path.is_dir() else None
        if path.exists() and not resume:
            if not overwrite:
                raise GSQError(f"a partial run of '{out}' exists in '{path}' (pass --resume to "
                               f"continue it, or --overwrite to start over)")
            shutil.rmtree(path)
            state = None
        if state is not None:
            reason = fingerprint_difference(state["fingerprint"], fingerprint)
            if reason:
                raise GSQError(f"cannot resume '{path}': {reason} (pass --overwrite without "
                               f"--resume to start over)")
        elif resume and path.exists():
            raise GSQError(f"cannot resume '{path}': it holds no {STATE_FILE} (remove it or pass "
                           f"--overwrite without --resume)")
        fresh = state is None
        if fresh:
            if resume:
                log.info("no partial run at %s: starting from block 0", path)
            state = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION,
                     "fingerprint": fingerprint, "blocks_total": blocks_total, "done": 0,
                     "inputs": None, "blocks": [], "modules": {}}
            for sub in ("out", "codes", "act"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        run = cls(path, state, _lock(path))
        if fresh:
            run._write_state()
        elif run.completed:
            run._remove_stage_leftovers()
        else:
            run._remove_unfinished()
        return run

    @staticmethod
    def _read_state(path: Path) -> dict | None:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise GSQError(f"cannot read '{path / STATE_FILE}': {err}") from err
        if state.get("format") != PARTIAL_FORMAT or state.get("version") != PARTIAL_VERSION:
            raise GSQError(f"'{path}' is not a gsq partial run of version {PARTIAL_VERSION}")
        return state

    def _remove_unfinished(self) -> None:
        """Files of blocks after the last finished one, and stale inputs (a kill mid-block)."""
        done, keep = self.done, set(self._input_files())
        for path in (self.path / "codes").glob("block-*.safetensors*"):
            if path.name.endswith(".part") or int(path.name[6:11]) >= done:
                path.unlink()
        for path in (self.path / "out").iterdir():
            if path.name.endswith(".part") or _shard_index(path.name) >= done:
                path.unlink()
        for path in (self.path / "act").glob("in-*"):
            if path.name not in keep:
                path.unlink()

    def _remove_stage_leftovers(self) -> None:
        """Temporary directories a stage on the completed `out/` left when it was killed (its
        atomic rewrites build `.out.*` beside `out/`)."""
        for path in self.path.glob(".out.*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- state -----------------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Number of finished blocks (the next block to quantize)."""
        return self.state["done"]

    @property
    def activation_folder(self) -> Path:
        return activation_folder(self.path)

    def shard_name(self, index: int) -> str:
        """File of block `index` (0-based); index == blocks_total is the non-block shard."""
        total = self.state["blocks_total"] + 1
        return f"model-{index + 1:05d}-of-{total:05d}.safetensors"

    def input_paths(self, index: int) -> dict[str, Path]:
        """Where the inputs of block `index` are persisted, per split."""
        return {s: self.path / "act" / f"in-{index:05d}-{s}.f32" for s in SPLITS}

    def _input_files(self) -> list[str]:
        inputs = self.state["inputs"] or {}
        return [Path(info["file"]).name for info in inputs.values()]

    def inputs(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """The persisted inputs of block `done`: split -> (file, shape)."""
        return {s: (self.path / "act" / info["file"], tuple(info["shape"]))
                for s, info in self.state["inputs"].items()}

    def _write_state(self) -> None:
        tmp = self.path / (STATE_FILE + ".part")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / STATE_FILE)
        _fsync_dir(self.path)

    # -- writing blocks --------------------------------------------------------------------

    def write_shard(self, index: int, entries: Iterable[TensorEntry]) -> None:
        write_safetensors(self.path / "out" / self.shard_name(index), entries)

    def write_codes(self, index: int, tensors: dict) -> None:
        write_safetensors(self.path / "codes" / f"block-{index:05d}.safetensors",
                          entries_of(tensors))

    def commit_block(self, index: int, report: dict, modules: dict,
                     shapes: dict[str, tuple[int, ...]]) -> None:
        """Mark block `index` finished (its shard, codes and the next inputs written)."""
        if index != self.done:
            raise GSQError(f"block {index} finished out of order (expected {self.done})")
        old = self._input_files()
        self.state["done"] = index + 1
        self.state["inputs"] = {s: {"file": self.input_paths(index + 1)[s].name,
                                    "shape": list(shape)} for s, shape in shapes.items()}
        self.state["blocks"].append(report)
        self.state["modules"].update(modules)
        self._write_state()
        for name in old:
            (self.path / "act" / name).unlink(missing_ok=True)

    # -- completing ------------------------------------------------------------------------

    @property
    def completed(self) -> bool:
        """Whether the block loop is over and `out/` complete (`complete`)."""
        return bool(self.state.get("completed"))

    @property
    def folder(self) -> Path:
        """`out/`, the future OUT."""
        return self.path / "out"

    def complete(self, config: dict, report: dict,
                 write_side_files: Callable[[Path], None]) -> Path:
        """Complete `out/` from the finished blocks: index, codes of every block in one file,
        gsq_config.json, report.json and `write_side_files(folder)` (config, tokenizer); then
        mark the run completed."""
        folder = self.folder
        write_index(folder, sorted(p.name for p in folder.glob("model-*.safetensors")))
        codes = sorted((self.path / "codes").glob("block-*.safetensors"))
        write_safetensors(folder / CODES_FILE, [e for path in codes for e in file_entries(path)])
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config,
                "modules": self.state["modules"]}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        write_side_files(folder)
        self.state["completed"] = True
        self._write_state()
        return folder

    def publish(self, out: str | Path, overwrite: bool) -> Path:
        """Rename the completed `out/` to OUT and remove the partial directory."""
        out = Path(out)
        if out.exists():
            if not overwrite:
                raise GSQError(f"output path '{out}' already exists (pass --overwrite to "
                               f"replace it)")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(self.folder, out)
        self.remove()
        return out

    def remove(self) -> None:
        """Delete the partial directory (a finished run, or a failure nothing can resume)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _shard_index(name: str) -> int:
    """0-based block index of a shard file name (`model-00004-of-...` -> 3)."""
    try:
        return int(name.split("-")[1]) - 1
    except (IndexError, ValueError):
        return 1 << 30  # anything else in out/ is written again when the run completes


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GSQError(f"another gsq run is using '{path}'") from None
    return fd


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fingerprint_difference(old: dict, new: dict, where: str = "") -> str | None:
    """The first difference between two fingerprints (config first), as a short reason, or
    None."""
    for key in [*new, *(k for k in old if k not in new)]:  # the new fingerprint's order
        a, b = old.get(key), new.get(key)
        path = f"{where}.{key}" if where else key
        if isinstance(a, dict) and isinstance(b, dict):
            found = fingerprint_difference(a, b, path)
            if found:
                return found
        elif a != b:
            return f"{_what(path)} differs ({path}: {_short(a)} -> {_short(b)})"
    return None


def _what(path: str) -> str:
    head = path.split(".")[0]
    return {"config": "the run config", "model": "the model", "calibration":
            "the calibration data", "versions": "the software version"}.get(head, head)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
