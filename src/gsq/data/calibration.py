"""Calibration text: where it comes from, how it becomes token windows.

The pipeline is `load_calibration_text` (a file, a folder of `.txt` files, a part of the bundled
mix, or a Hugging Face dataset) -> `tokenize_text` (the whole text once, one 1-D token stream) ->
`cut_windows` (non-overlapping `seqlen`-token chunks, shuffled with a seed and dealt out to disjoint
splits such as train / val / gptq).

A calibration spec names several sources with proportions (`parse_calib_spec`, e.g.
"fiction:0.3,code:0.2,notes.txt:0.5"); `load_calibration_mix` tokenizes each source on its own
(optionally rendered in the tokenizer's chat template) and `cut_windows` then gives every split its
share of windows from each source. Without a spec the default is the bundled mix (`DEFAULT_MIX`).

`tokenize_text` is also what the evaluation code uses, so calibration and evaluation tokenize text
the same way.
"""

from __future__ import annotations

import gzip
import importlib
import logging
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError

log = logging.getLogger(__name__)

BUNDLED_TEXT = "pg1342.txt"  # Pride and Prejudice, see data/bundled/README.md
# The bundled calibration mix (data/bundled/mix/README.md: sources and licences): part -> files
BUNDLED_SOURCES: dict[str, tuple[str, ...]] = {
    "fiction": ("mix/fiction.txt.gz", BUNDLED_TEXT),  # two novels
    "encyclopedic": ("mix/encyclopedic.txt.gz",),  # country articles of the World Factbook
    "technical": ("mix/technical.txt.gz",),  # Python Enhancement Proposals
    "code": ("mix/code.txt.gz",),  # Python standard-library modules
    "dialogue": ("mix/dialogue.txt.gz",),  # Shakespeare's plays
    "book": (BUNDLED_TEXT,),  # Pride and Prejudice alone (the default before the mix)
}
# The default calibration spec ("mix" names it too): every kind of text of the bundled mix
DEFAULT_MIX = "fiction:0.25,encyclopedic:0.2,technical:0.2,code:0.15,dialogue:0.2"
DEFAULT_MAX_CHARS = 20_000_000  # ~5M tokens: far more than any calibration run needs
TOKENIZE_CHUNK_CHARS = 1_000_000  # fast tokenizers slow down badly on single huge strings


@dataclass(frozen=True)
class _DatasetSpec:
    """How to stream one known Hugging Face dataset."""

    path: str
    name: str
    split: str
    shuffle: bool  # shuffle with a seeded buffer (for corpora stored in a meaningful order)
    separator: str  # what goes between documents


# Known dataset names for `--calib`. All of them are training splits: calibration text must never
# overlap the evaluation text (WikiText-2 *test*).
KNOWN_DATASETS: dict[str, _DatasetSpec] = {
    "fineweb-edu": _DatasetSpec("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, "\n\n"),
    "c4": _DatasetSpec("allenai/c4", "en", "train", False, "\n\n"),
    # WikiText rows are single lines that already end with "\n" (or are empty): joining them with
    # "" rebuilds the raw training file.
    "wikitext": _DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", "train", False, ""),
}
_SHUFFLE_BUFFER = 10_000


# --------------------------------------------------------------------------------------------
# Plain text files


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file (gzip-compressed if its name ends in `.gz`), or all `*.txt` files of
    a folder (sorted by name, joined by a blank line). Line endings are normalised to "\\n"
    (Python's universal newlines)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GSQError(f"calibration path '{path}' does not exist")
    if path.is_dir():
        parts = sorted(path.glob("*.txt"), key=lambda p: p.name)
        if not parts:
            raise GSQError(f"calibration folder '{path}' contains no .txt files")
        text = "\n\n".join(_read_one(p) for p in parts)
        log.info("read %d text files (%s chars) from %s", len(parts), f"{len(text):,}", path)
    else:
        text = _read_one(path)
    if not text.strip():
        raise GSQError(f"calibration text '{path}' is empty")
    return text


def _read_one(path: Path) -> str:
    try:
        # utf-8-sig: plain UTF-8, minus a leading byte-order mark if an editor wrote one.
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GSQError(
            f"calibration file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    except OSError as e:
        raise GSQError(f"cannot read calibration file '{path}': {e.strerror or e}") from e


def bundled_text_path() -> Path:
    """Path of the bundled default calibration book (package data)."""
    resource = files("gsq.data").joinpath("bundled", BUNDLED_TEXT)
    # gsq is always installed as plain files (never zipped), so the resource is a real path.
    return Path(str(resource))


# --------------------------------------------------------------------------------------------
# Choosing a source


def load_calibration_text(source: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Calibration text of one source.

    None -> the bundled book; a part of the bundled mix (`BUNDLED_SOURCES`) -> its files; an
    existing file or folder -> `read_text`; one of `KNOWN_DATASETS` -> up to about `max_chars`
    characters of that Hugging Face dataset (needs `datasets`).
    """
    if source is None:
        return read_text(bundled_text_path())
    if source in BUNDLED_SOURCES:
        return "\n\n".join(read_text(_bundled(name)) for name in BUNDLED_SOURCES[source])
    if Path(source).expanduser().exists():
        return read_text(source)
    if source in KNOWN_DATASETS:
        return _load_dataset_text(source, max_chars)
    known = ", ".join([*BUNDLED_SOURCES, *KNOWN_DATASETS])
    raise GSQError(
        f"calibration source '{source}' is neither a file/folder nor a known source ({known})"
    )


def _bundled(name: str) -> Path:
    return Path(str(files("gsq.data").joinpath("bundled", *name.split("/"))))


def _load_dataset_text(name: str, max_chars: int) -> str:
    """Stream documents of a known dataset until `max_chars` characters are collected."""
    if max_chars <= 0:
        raise GSQError(f"max_chars must be positive, got {max_chars}")
    spec = KNOWN_DATASETS[name]
    datasets = _import_datasets()
    log.info("streaming calibration text from %s (%s, %s split)", spec.path, spec.name, spec.split)
    docs: list[str] = []
    total = 0
    try:
        stream = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
        if spec.shuffle:
            stream = stream.shuffle(seed=0, buffer_size=_SHUFFLE_BUFFER)
        for row in stream:
            doc = row["text"]
            if not doc.strip():
                continue
            docs.append(doc)
            total += len(doc) + len(spec.separator)
            if total >= max_chars:
                break
    except Exception as e:  # network, auth, schema: all mean "could not get the data"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GSQError(
            f"cannot download calibration dataset '{name}' ({spec.path}): {reason}"
        ) from e
    if not docs:
        raise GSQError(f"calibration dataset '{name}' ({spec.path}) returned no text")
    text = spec.separator.join(docs)
    log.info("collected %d documents, %s chars", len(docs), f"{len(text):,}")
    return text


def _import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise GSQError(
            "calibration from a Hugging Face dataset needs the 'datasets' package: "
            "pip install datasets (or pip install 'gsq-quant[datasets]')"
        ) from None


# --------------------------------------------------------------------------------------------
# Several sources with proportions


@dataclass(frozen=True)
class CalibSource:
    """One source of a calibration spec and its share of the windows (shares sum to 1)."""

    source: str  # a part of the bundled mix, a file or folder, or a known dataset
    weight: float


def parse_calib_spec(spec: str | None) -> list[CalibSource]:
    """`SOURCE[:WEIGHT],SOURCE[:WEIGHT],...` -> sources with weights normalised to sum 1.

    None or "mix" is `DEFAULT_MIX`. Either every source has a weight (a positive number; they are
    normalised, so 3:1 and 0.75:0.25 are the same) or none has (equal shares). A source is
    whatever `load_calibration_text` accepts; the text after its last ":" is read as the weight
    if it is a number, so a file name ending in ":NUMBER" or containing "," cannot be given.
    """
    if spec is None or spec.strip() == "mix":
        spec = DEFAULT_MIX
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise GSQError(f"calibration spec '{spec}' has an empty entry")
    parsed: list[tuple[str, float | None]] = []
    for item in items:
        head, sep, tail = item.rpartition(":")
        weight = _weight(tail, item) if sep and head else None
        parsed.append((head, weight) if weight is not None else (item, None))
    weights = [w for _, w in parsed if w is not None]
    if weights and len(weights) != len(parsed):
        raise GSQError(f"calibration spec '{spec}': give a weight to every source or to none")
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise GSQError(f"calibration spec '{spec}' names a source twice")
    total = sum(weights) if weights else float(len(parsed))
    return [CalibSource(name, (w if w is not None else 1.0) / total) for name, w in parsed]


def _weight(text: str, item: str) -> float | None:
    """The weight `text` of spec entry `item`, None if `text` is not a number (part of a name)."""
    try:
        weight = float(text)
    except ValueError:
        return None
    if not (math.isfinite(weight) and weight > 0):
        raise GSQError(f"calibration weight must be a positive number; got '{item}'")
    return weight


@dataclass
class TokenMix:
    """Token streams of several sources and their shares of the windows (see `cut_windows`)."""

    parts: list[tuple[CalibSource, torch.Tensor]]  # (source, 1-D LongTensor)

    def numel(self) -> int:
        return sum(tokens.numel() for _, tokens in self.parts)


def load_calibration_mix(tokenizer: Any, spec: str | None, chat_template: bool = False,
                         max_chars: int = DEFAULT_MAX_CHARS) -> TokenMix:
    """Each source of `spec` (`parse_calib_spec`) read and tokenized on its own; with
    `chat_template`, rendered as conversations in the tokenizer's chat template first."""
    parts = []
    for source in parse_calib_spec(spec):
        text = load_calibration_text(source.source, max_chars)
        if chat_template:
            text = render_chat(tokenizer, text)
        parts.append((source, tokenize_text(tokenizer, text)))
        log.info("calibration source %s: %s tokens, %.0f%% of the windows", source.source,
                 f"{parts[-1][1].numel():,}", 100 * source.weight)
    return TokenMix(parts)


CHAT_CHARS = 2_000  # about this much text per rendered conversation


def render_chat(tokenizer: Any, text: str) -> str:
    """`text` as conversations in the tokenizer's chat template, for instruct models.

    The text is cut at blank lines into pieces of about `CHAT_CHARS` characters; each piece
    becomes one exchange, its first paragraph the user's message and the rest the assistant's
    answer (a one-paragraph piece is all answer, after an empty user turn). The rendered
    conversations are joined as they come; the template's special tokens are tokenized as such.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise GSQError("--chat-template: the tokenizer has no chat template")
    out = []
    for piece in _pieces(text, CHAT_CHARS):
        first, _, rest = piece.partition("\n\n")
        user, answer = (first, rest) if rest.strip() else ("", first)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "".join(out)


def _pieces(text: str, size: int) -> list[str]:
    """Paragraphs of `text` (split at blank lines) grouped into pieces of about `size` chars."""
    pieces, current, length = [], [], 0
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        current.append(para)
        length += len(para)
        if length >= size:
            pieces.append("\n\n".join(current))
            current, length = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


# --------------------------------------------------------------------------------------------
# Tokens


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize the whole text once, without special tokens (no BOS/EOS).

    Returns a 1-D LongTensor [n_tokens]. Texts over ~1 MB are tokenized in pieces cut at line
    breaks where regex pre-tokenizers (GPT-2, Llama-3, Qwen style) always end a pre-token, so the
    ids equal those of a single call; a tokenizer for which a quick probe shows otherwise (e.g. one
    that prepends a space to every input) gets the text in a single call.
    """
    pieces = _split_for_tokenizer(text, TOKENIZE_CHUNK_CHARS)
    if len(pieces) > 1 and not _piecewise_is_exact(tokenizer):
        log.debug("tokenizer is not exact piecewise; tokenizing %s chars at once", f"{len(text):,}")
        pieces = [text]
    ids: list[int] = []
    for piece in pieces:
        ids.extend(_encode(tokenizer, piece))
    return torch.tensor(ids, dtype=torch.long)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: silence the "sequence longer than model_max_length" warning, irrelevant here
    # because the stream is cut into windows afterwards.
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return list(enc["input_ids"])


# Has both kinds of cut `_safe_cut` makes: "line.\n|Second" and "12 \n| third".
_PROBE = "First line.\nSecond line 12 \n third line\n\nFourth.\n"


def _piecewise_is_exact(tokenizer: Any) -> bool:
    """Does tokenizing _PROBE in pieces at the safe cuts give the ids of one call?"""
    whole = _encode(tokenizer, _PROBE)
    pieces = _split_for_tokenizer(_PROBE, 1)  # every safe cut: 3 pieces
    return whole == [i for piece in pieces for i in _encode(tokenizer, piece)]


def _split_for_tokenizer(text: str, chunk_chars: int) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` chars at safe line breaks (`_safe_cut`)."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = _safe_cut(text, start + chunk_chars)
        if cut is None:  # no safe boundary after this point: keep the rest whole
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _safe_cut(text: str, lo: int) -> int | None:
    """First index i >= lo right after a "\\n" where a pre-token always ends: either
    "x\\n|y" (x, y not whitespace: a lone newline) or "\\n| y" (one space, then a non-space).

    In those places every common regex pre-tokenizer ends a pre-token at i whether or not the text
    continues, and pre-tokens from i on do not depend on what came before (the regexes have no
    look-behind).
    """
    pos = text.find("\n", max(lo - 1, 1))
    while pos != -1 and pos + 2 < len(text):
        a, b, c = text[pos - 1], text[pos + 1], text[pos + 2]
        if not b.isspace() and not a.isspace():
            return pos + 1
        if b == " " and not c.isspace():
            return pos + 1
        pos = text.find("\n", pos + 1)
    return None


def cut_windows(
    tokens: torch.Tensor | TokenMix, counts: dict[str, int], seqlen: int, seed: int
) -> dict[str, torch.Tensor]:
    """Deal disjoint `seqlen`-token windows of a token stream (or a mix) out to named splits.

    tokens: LongTensor [N]. The stream is cut into floor(N / seqlen) non-overlapping chunks (the
    tail is dropped), the chunks are shuffled with `seed`, and consecutive runs of the shuffled
    order go to the splits in dict order. Returns {split: LongTensor [counts[split], seqlen]}.

    A `TokenMix` gives every split its share of each source (largest remainders, so the counts
    are exact), each source's windows cut from its own stream as above with a seed of its own,
    and each split's windows shuffled together with `seed`.
    """
    if isinstance(tokens, TokenMix):
        return _cut_mix(tokens, counts, seqlen, seed)
    if tokens.dim() != 1:
        raise GSQError(f"token stream must be 1-D, got shape {tuple(tokens.shape)}")
    if seqlen < 2:
        raise GSQError(f"window length must be at least 2 tokens, got {seqlen}")
    for split, n in counts.items():
        if n < 0:
            raise GSQError(f"number of '{split}' windows must not be negative, got {n}")

    n_chunks = tokens.numel() // seqlen
    need = sum(counts.values())
    if need > n_chunks:
        detail = " + ".join(f"{split} {n}" for split, n in counts.items())
        raise GSQError(
            f"calibration text has {tokens.numel():,} tokens = {n_chunks:,} windows of {seqlen}; "
            f"need {need:,} ({detail})"
        )

    chunks = tokens[: n_chunks * seqlen].view(n_chunks, seqlen)  # [n_chunks, seqlen]
    order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))
    out: dict[str, torch.Tensor] = {}
    start = 0
    for split, n in counts.items():
        out[split] = chunks[order[start : start + n]].clone()  # [n, seqlen]
        start += n
    return out


def _cut_mix(mix: TokenMix, counts: dict[str, int], seqlen: int,
             seed: int) -> dict[str, torch.Tensor]:
    weights = [source.weight for source, _ in mix.parts]
    shares = {split: _apportion(n, weights) for split, n in counts.items()}
    pieces: dict[str, list[torch.Tensor]] = {split: [] for split in counts}
    for i, (source, tokens) in enumerate(mix.parts):
        part_counts = {split: shares[split][i] for split in counts}
        try:
            cut = cut_windows(tokens, part_counts, seqlen, seed * 1_000_003 + i + 1)
        except GSQError as err:
            raise GSQError(f"calibration source '{source.source}' "
                           f"({100 * source.weight:.0f}% of the windows): {err}") from err
        for split in counts:
            pieces[split].append(cut[split])
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for split, parts in pieces.items():
        windows = torch.cat(parts) if parts else torch.zeros(0, seqlen, dtype=torch.long)
        out[split] = windows[torch.randperm(windows.shape[0], generator=gen)]
    return out


def _apportion(n: int, weights: list[float]) -> list[int]:
    """n split in proportion to `weights` (summing to 1), by largest remainders (first wins
    ties): every share is floor(n * w) or one more, and they sum to n."""
    exact = [n * w for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def window_capacity(tokens: torch.Tensor | TokenMix, seqlen: int, splits: int = 4) -> int:
    """How many windows of `seqlen` `cut_windows` can surely deal out over up to `splits` splits
    (a mix: limited by its scarcest source relative to its share, less rounding)."""
    if isinstance(tokens, TokenMix):
        return max(0, min(math.floor((t.numel() // seqlen - splits) / s.weight)
                          for s, t in tokens.parts))
    return tokens.numel() // seqlen
