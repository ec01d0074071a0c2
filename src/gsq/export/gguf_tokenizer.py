"""llama.cpp tokenizer keys for a GGUF file (formats.md B.2): copied from a source GGUF, or
converted from an HF tokenizer of one of two kinds:
  * byte-level BPE `tokenizer.json` (GPT-2 / SmolLM / Llama-3 / Qwen2 pre-tokenizers): llama.cpp's
    `gpt2` vocabulary (tokens, types, merges, `tokenizer.ggml.pre`);
  * SentencePiece BPE (Llama 1-2, Mistral 7B, Mixtral): a `tokenizer.json` of BPE with byte
    fallback and `▁` for spaces, or only a `tokenizer.model`: llama.cpp's `llama` vocabulary
    (tokens, scores, types; no merges, no pre-tokenizer name), as llama.cpp's converter writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsq.errors import GSQError
from gsq.gguf import KeyValue, field_value, read_gguf

# HF pre-tokenizer layouts we can name for llama.cpp (tokenizer.ggml.pre).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 / Qwen2.5 / Qwen3: Llama-3's split with single digits, after an NFC normalizer (which
# llama.cpp does not apply: text that is not already NFC tokenizes differently there, as with
# every Qwen GGUF file)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

BYTE_LEVEL, SENTENCEPIECE = "gpt2", "llama"  # llama.cpp's vocabulary names (tokenizer.ggml.model)
SPACE = "\u2581"  # SentencePiece's space
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_CONVERTIBLE = ("GGUF export converts byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 / Qwen2 "
                "style) and SentencePiece BPE ones (Llama 2 / Mistral style)")


def tokenizer_kv_from_gguf(path: str | Path, n_vocab: int) -> list[KeyValue]:
    """Every `tokenizer.*` key of a GGUF file, to copy verbatim (B.2's practical rule)."""
    from gguf import GGUFValueType

    fields, _ = read_gguf(path)
    kv = []
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            kv.append((key, field_value(field), field.types[0], sub))
    tokens = next((v for k, v, _, _ in kv if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise GSQError(f"GGUF file '{path}' has no tokenizer")
    if len(tokens) != n_vocab:
        raise GSQError(f"the tokenizer of '{path}' has {len(tokens)} tokens but the model's "
                       f"vocabulary has {n_vocab}")
    return kv


def tokenizer_kv_from_hf(tok_dir: str | Path, n_vocab: int) -> list[KeyValue]:
    """llama.cpp tokenizer keys converted from the HF tokenizer in `tok_dir`, of either kind
    `hf_tokenizer_kind` accepts; GSQError for any other tokenizer."""
    tok_dir = Path(tok_dir)
    spec = _read_tokenizer_json(tok_dir)
    if _kind(tok_dir, spec) == SENTENCEPIECE:
        return _sentencepiece_kv(tok_dir, spec, n_vocab)
    return _byte_level_kv(tok_dir, spec, n_vocab)


def hf_tokenizer_kind(tok_dir: str | Path) -> str:
    """The llama.cpp vocabulary ('gpt2' or 'llama') the HF tokenizer in `tok_dir` converts to, or
    GSQError naming what converts. Read from the tokenizer files alone (no transformers), so that
    a run can refuse an unconvertible tokenizer before it loads any weight."""
    tok_dir = Path(tok_dir)
    return _kind(tok_dir, _read_tokenizer_json(tok_dir))


def check_source_tokenizer(source: str) -> None:
    """GSQError, before any weight is loaded, unless the tokenizer of an HF model source (a
    folder, or a hub id whose tokenizer files are fetched) converts to GGUF. Tokenizer files that
    cannot be found are left to the model loader to report."""
    path = Path(source).expanduser()
    path = path if path.is_dir() else _hub_tokenizer_dir(source)
    if path is not None and any((path / name).is_file() for name in _TOKENIZER_FILES):
        hf_tokenizer_kind(path)


def _hub_tokenizer_dir(source: str) -> Path | None:
    """The cache folder of a hub model's tokenizer.json / tokenizer.model, None if it has none."""
    from transformers.utils import cached_file

    from gsq.models.loading import looks_like_path

    if looks_like_path(source):
        return None
    try:
        found = [cached_file(source, name, _raise_exceptions_for_missing_entries=False)
                 for name in _TOKENIZER_FILES]
    except (OSError, ValueError):  # unreachable, or not a valid hub id
        return None
    return next((Path(f).parent for f in found if f), None)


def _read_tokenizer_json(tok_dir: Path) -> dict | None:
    path = tok_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _kind(tok_dir: Path, spec: dict | None) -> str:
    """`hf_tokenizer_kind` of the folder `tok_dir` whose tokenizer.json holds `spec` (None when
    it has none: then a tokenizer.model is SentencePiece's own file)."""
    if spec is None:
        if (tok_dir / "tokenizer.model").is_file():
            return SENTENCEPIECE
        raise GSQError(f"'{tok_dir}' has no tokenizer.json or tokenizer.model; {_CONVERTIBLE}")
    if is_sentencepiece_bpe(spec):
        _check_sentencepiece_steps(spec)
        return SENTENCEPIECE
    if not is_byte_level_bpe(spec):
        model = (spec.get("model") or {}).get("type") or "unknown"
        raise GSQError(f"cannot convert this {model} tokenizer to GGUF: {_CONVERTIBLE}; export "
                       "from a .gguf source to copy its tokenizer")
    bpe_pre_name(spec)  # GSQError for a byte-level layout llama.cpp has no name for
    return BYTE_LEVEL


def is_byte_level_bpe(spec: dict) -> bool:
    """BPE over bytes spelled as characters (GPT-2's ByteLevel decoder), no byte fallback."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and \
        decoder.get("type") == "ByteLevel"


def is_sentencepiece_bpe(spec: dict) -> bool:
    """BPE with byte fallback and a Sequence decoder (▁ to space, bytes, fuse): the
    tokenizer.json transformers makes of a SentencePiece BPE model (gguf.LlamaHfVocab's test)."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and \
        decoder.get("type") == "Sequence"


_PREPEND = {"type": "Prepend", "prepend": SPACE}
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}


def _check_sentencepiece_steps(spec: dict) -> None:
    """GSQError unless the tokenizer only writes spaces as ▁ (and puts one first), by a Prepend +
    Replace normalizer (Llama 2, Mistral v0.1) or a Metaspace pre-tokenizer that does not split
    (Mistral v0.3, transformers 5): llama.cpp's SentencePiece tokenizer does that and nothing
    else, so any other step would split or rewrite text that llama.cpp leaves whole."""
    others = [s.get("type") for s in _normalizer_steps(spec) if s not in (_PREPEND, _REPLACE)]
    pre = spec.get("pre_tokenizer")
    if pre and not (pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and
                    pre.get("split") is False):
        others.append(f"{pre.get('type')} pre-tokenizer")
    if others:
        raise GSQError(f"cannot convert a SentencePiece BPE tokenizer with {', '.join(others)} "
                       "steps to GGUF: llama.cpp would split its text differently")


def _normalizer_steps(spec: dict) -> list[dict]:
    norm = spec.get("normalizer") or {}
    return norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm \
        else []


def _byte_level_kv(tok_dir: Path, spec: dict, n_vocab: int) -> list[KeyValue]:
    """llama.cpp `gpt2` vocabulary keys: tokens, types, merges and the pre-tokenizer's name."""
    from gguf import GGUFValueType as V
    from transformers import AutoTokenizer

    pre = bpe_pre_name(spec)
    tokens, types = _bpe_tokens(spec, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise GSQError(f"the tokenizer in '{tok_dir}' has no BPE merges; llama.cpp needs them")
    kv: list[KeyValue] = [
        ("tokenizer.ggml.model", BYTE_LEVEL, V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    adds = _adds_bos_eos(AutoTokenizer.from_pretrained(str(tok_dir)))
    return kv + _special_kv(tok_dir, n_vocab, adds)


def bpe_pre_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for an HF tokenizer.json, or GSQError if it is not one of
    the byte-level BPE layouts we can name: 'gpt-2', 'smollm' (digits split, then GPT-2),
    'llama-bpe' (the Llama-3 regex) or 'qwen2' (its single-digit variant, NFC normalizer)."""
    if not is_byte_level_bpe(spec):
        raise GSQError("only byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 / Qwen2 style) "
                       "have a llama.cpp pre-tokenizer name")
    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    name = _pre_name(steps, kinds, bool(model.get("ignore_merges")))
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer and not (name == "qwen2" and normalizer == "NFC"):
        raise GSQError(f"cannot convert a byte-level BPE tokenizer with a {normalizer} "
                       f"normalizer to GGUF")
    return name


def _pre_name(steps: list[dict], kinds: list, ignore_merges: bool) -> str:
    """The llama.cpp name of a byte-level pre-tokenizer layout (`bpe_pre_name`). llama.cpp looks
    whole words up before merging for llama-bpe only (HF: ignore_merges)."""
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and \
            not steps[0].get("add_prefix_space") and not ignore_merges:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and \
            steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space") and \
            not ignore_merges:
        return "smollm"
    regex = (steps[0].get("pattern") or {}).get("Regex") if kinds == ["Split", "ByteLevel"] \
        else None
    split = regex is not None and not steps[1].get("use_regex", True) and \
        not steps[1].get("add_prefix_space")
    if split and regex == _LLAMA3_REGEX and ignore_merges:
        return "llama-bpe"
    if split and regex == _QWEN2_REGEX and not ignore_merges:
        return "qwen2"
    raise GSQError(f"cannot name this tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) "
                   "for llama.cpp")


def _bpe_tokens(spec: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded to n_vocab with unused tokens."""
    from gguf import TokenType

    by_id = {int(i): (tok, int(TokenType.NORMAL)) for tok, i in spec["model"]["vocab"].items()}
    by_id.update(_added_tokens(spec))
    rows = _padded(by_id, n_vocab, lambda i: (f"[PAD{i}]", int(TokenType.UNUSED)))
    return [tok for tok, _ in rows], [kind for _, kind in rows]


def _added_tokens(spec: dict) -> dict[int, tuple[str, int]]:
    """id -> (token, llama.cpp type) of the tokenizer.json's added tokens: CONTROL if special,
    else USER_DEFINED (llama.cpp, as HF, matches either whole in a text)."""
    from gguf import TokenType

    return {int(added["id"]): (added["content"], int(TokenType.CONTROL if added.get("special")
                                                      else TokenType.USER_DEFINED))
            for added in spec.get("added_tokens", [])}


def _padded(by_id: dict[int, tuple], n_vocab: int, pad: Callable[[int], tuple]) -> list[tuple]:
    """The entries of ids 0..n_vocab-1, `pad(i)` for an id the tokenizer lacks (a model's
    vocabulary is often rounded up; llama.cpp's converter fills it with unused `[PAD{i}]`)."""
    if max(by_id) >= n_vocab:
        raise GSQError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has "
                       f"{n_vocab} entries")
    return [by_id[i] if i in by_id else pad(i) for i in range(n_vocab)]


# --------------------------------------------------------------------------------------------
# SentencePiece BPE (llama.cpp's `llama` vocabulary)


@dataclass(frozen=True)
class _SentencePieceVocab:
    entries: list[tuple[str, float, int]]  # by id: token, score, llama.cpp token type
    add_space_prefix: bool  # ▁ put before a text
    add_bos_eos: tuple[bool, bool]
    default_ids: dict[str, int]  # special ids where gguf.SpecialVocab finds none


def _sentencepiece_kv(tok_dir: Path, spec: dict | None, n_vocab: int) -> list[KeyValue]:
    """llama.cpp `llama` vocabulary keys from tokenizer.json (`_llama_hf_vocab`) or, without one,
    tokenizer.model (`_sentencepiece_model_vocab`), padded to the model's vocabulary as
    llama.cpp's converter pads it. No tokenizer.ggml.pre: llama.cpp reads none for this vocabulary
    (its SentencePiece tokenizer has no pre-tokenizer)."""
    from gguf import GGUFValueType as V
    from gguf import TokenType

    vocab = _llama_hf_vocab(tok_dir, spec) if spec is not None else \
        _sentencepiece_model_vocab(tok_dir)
    rows = _padded(dict(enumerate(vocab.entries)), n_vocab,
                   lambda i: (f"[PAD{i}]", -1000.0, int(TokenType.UNUSED)))
    kv: list[KeyValue] = [
        ("tokenizer.ggml.model", SENTENCEPIECE, V.STRING, None),
        ("tokenizer.ggml.tokens", [tok for tok, _, _ in rows], V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", [score for _, score, _ in rows], V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", [kind for _, _, kind in rows], V.ARRAY, V.INT32),
        ("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix, V.BOOL, None),
    ]
    return kv + _special_kv(tok_dir, n_vocab, vocab.add_bos_eos, vocab.default_ids)


def _llama_hf_vocab(tok_dir: Path, spec: dict) -> _SentencePieceVocab:
    """Tokens and types of a SentencePiece BPE tokenizer.json by gguf.LlamaHfVocab, added tokens
    typed as in the byte-level case (LlamaHfVocab makes CONTROL only the tokens transformers
    lists as special), scored by `_merge_scores` (LlamaHfVocab scores every token -1000)."""
    from gguf.vocab import LlamaHfVocab

    vocab = LlamaHfVocab(tok_dir)
    if sorted(vocab.added_tokens_ids) != list(range(vocab.vocab_size_base, vocab.vocab_size)):
        raise GSQError(f"the tokenizer in '{tok_dir}' has added tokens with gaps between their "
                       "ids; they cannot be placed in a GGUF vocabulary")
    scores = _merge_scores(spec)
    unmerged = min(scores.values(), default=0.0) - 1.0
    added = _added_tokens(spec)
    entries = [(text.decode("utf-8"), scores.get(text.decode("utf-8"), unmerged),
                added[i][1] if i in added else int(kind))
               for i, (text, _, kind) in enumerate(vocab.all_tokens())]
    return _SentencePieceVocab(entries, _prepends_space(spec), _adds_bos_eos(vocab.tokenizer), {})


def _merge_scores(spec: dict) -> dict[str, float]:
    """Token -> minus the rank of the first merge that makes it. llama.cpp's SentencePiece
    tokenizer repeatedly joins the adjacent pair whose joined token scores highest (leftmost on a
    tie), HF's BPE the pair whose merge ranks first: with these scores both join in the same
    order (with equal scores llama.cpp would join left to right). Tokens no merge makes (bytes,
    control tokens) get a score below all."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        scores.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge),
                          -float(rank))
    return scores


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts ▁ before a text (tokenizer.ggml.add_space_prefix). llama.cpp
    puts it before every text; a Metaspace pre-tokenizer with prepend scheme 'first' not before
    one that begins with a space, so such a text gets one ▁ more in llama.cpp (as in
    sentencepiece itself, and in every llama.cpp conversion of such a tokenizer)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return _PREPEND in _normalizer_steps(spec)


def _sentencepiece_model_vocab(tok_dir: Path) -> _SentencePieceVocab:
    """Tokens, scores and types of tokenizer.model (and added_tokens.json) by
    gguf.SentencePieceVocab; BOS/EOS as tokenizer_config.json says, else llama.cpp's defaults
    for this vocabulary (BOS, no EOS)."""
    try:
        import sentencepiece  # noqa: F401  (gguf.vocab needs it for SentencePieceVocab)
    except ImportError:
        raise GSQError("converting a tokenizer.model to GGUF needs the sentencepiece package: "
                       "pip install sentencepiece") from None
    from gguf.vocab import SentencePieceVocab

    vocab = SentencePieceVocab(tok_dir)
    sp = vocab.sentencepiece_tokenizer
    entries = [(text.decode("utf-8"), float(score), int(kind))
               for text, score, kind in vocab.all_tokens()]
    ids = {kind: i for kind, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                   ("unk", sp.unk_id()), ("pad", sp.pad_id())) if i >= 0}
    prefix = sp.encode("a", out_type=str)[0].startswith(SPACE)
    path = tok_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    adds = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    return _SentencePieceVocab(entries, prefix, adds, ids)


# --------------------------------------------------------------------------------------------
# Both kinds


def _special_kv(tok_dir: Path, n_vocab: int, add_bos_eos: tuple[bool, bool],
                default_ids: dict[str, int] | None = None) -> list[KeyValue]:
    """bos/eos/unk/pad ids (gguf.SpecialVocab's, else `default_ids`) and the chat template, and
    whether the tokenizer adds BOS/EOS to an encoded text."""
    import gguf
    from gguf import GGUFValueType as V

    keys = gguf.Keys.Tokenizer
    key_of = {"bos": keys.BOS_ID, "eos": keys.EOS_ID, "unk": keys.UNK_ID, "pad": keys.PAD_ID,
              "sep": keys.SEP_ID, "mask": keys.MASK_ID}
    special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=n_vocab)
    ids = {**(default_ids or {}), **special.special_token_ids}
    kv: list[KeyValue] = [(key_of[kind], tid, V.UINT32, None)
                          for kind, tid in ids.items() if kind in key_of]
    add_bos, add_eos = add_bos_eos
    kv += [("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None),
           ("tokenizer.ggml.add_eos_token", add_eos, V.BOOL, None)]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    return kv


def _adds_bos_eos(tok: Any) -> tuple[bool, bool]:
    """Does the HF tokenizer put BOS first / EOS last when special tokens are on?"""
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(with_special) > len(plain) and \
        with_special[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(with_special) > len(plain) and \
        with_special[-1] == tok.eos_token_id
    return bool(add_bos), bool(add_eos)


