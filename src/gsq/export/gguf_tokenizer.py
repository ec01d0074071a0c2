"""llama.cpp tokenizer keys for a GGUF file: copied from a source GGUF, or converted from an HF
`tokenizer.json` of byte-level BPE type (GPT-2 / SmolLM / Llama-3 / Qwen2 pre-tokenizers)
(formats.md B.2)."""

from __future__ import annotations

import json
from pathlib import Path

from gsq.errors import GSQError
from gsq.gguf import KeyValue, field_value, read_gguf

# HF pre-tokenizer layouts we can name for llama.cpp (tokenizer.ggml.pre).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 / Qwen2.5 / Qwen3: Llama-3's split with single digits, after an NFC normalizer (which
# llama.cpp does not apply: text that is not already NFC tokenizes differently there, as with
# every Qwen GGUF file)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


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
    """llama.cpp tokenizer keys converted from an HF `tokenizer.json` of byte-level BPE type
    (GPT-2, SmolLM, Llama-3 pre-tokenizers); GSQError for any other tokenizer."""
    from gguf import GGUFValueType as V

    tok_dir = Path(tok_dir)
    spec = _read_tokenizer_json(tok_dir)
    pre = bpe_pre_name(spec)
    tokens, types = _bpe_tokens(spec, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise GSQError(f"the tokenizer in '{tok_dir}' has no BPE merges; llama.cpp needs them")
    kv: list[KeyValue] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    return kv + _special_kv(tok_dir, n_vocab)


def _read_tokenizer_json(tok_dir: Path) -> dict:
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise GSQError(f"'{tok_dir}' has no tokenizer.json; only fast (tokenizer.json) "
                       "tokenizers can be converted to GGUF")
    return json.loads(path.read_text(encoding="utf-8"))


def bpe_pre_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for an HF tokenizer.json, or GSQError if it is not one of
    the byte-level BPE layouts we can name: 'gpt-2', 'smollm' (digits split, then GPT-2),
    'llama-bpe' (the Llama-3 regex) or 'qwen2' (its single-digit variant, NFC normalizer)."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            decoder.get("type") != "ByteLevel":
        raise GSQError("only byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 / Qwen2 style) "
                       "can be converted to GGUF; export from a .gguf source to copy its "
                       "tokenizer")
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
    for added in spec.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    if max(by_id) >= n_vocab:
        raise GSQError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has "
                       f"{n_vocab} entries")
    tokens, types = [], []
    for i in range(n_vocab):
        tok, kind = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(tok)
        types.append(kind)
    return tokens, types


def _special_kv(tok_dir: Path, n_vocab: int) -> list[KeyValue]:
    """bos/eos/unk/pad ids and the chat template (gguf.SpecialVocab), and whether the HF tokenizer
    adds BOS/EOS to an encoded text."""
    import gguf
    from gguf import GGUFValueType as V

    keys = gguf.Keys.Tokenizer
    key_of = {"bos": keys.BOS_ID, "eos": keys.EOS_ID, "unk": keys.UNK_ID, "pad": keys.PAD_ID,
              "sep": keys.SEP_ID, "mask": keys.MASK_ID}
    special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=n_vocab)
    kv: list[KeyValue] = [(key_of[kind], tid, V.UINT32, None)
                          for kind, tid in special.special_token_ids.items() if kind in key_of]
    add_bos, add_eos = _adds_bos_eos(tok_dir)
    kv += [("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None),
           ("tokenizer.ggml.add_eos_token", add_eos, V.BOOL, None)]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    return kv


def _adds_bos_eos(tok_dir: Path) -> tuple[bool, bool]:
    """Does the HF tokenizer put BOS first / EOS last when special tokens are on?"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(with_special) > len(plain) and \
        with_special[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(with_special) > len(plain) and \
        with_special[-1] == tok.eos_token_id
    return bool(add_bos), bool(add_eos)


