"""SentencePiece BPE tokenizers (Llama 2, Mistral 7B, Mixtral) in GGUF files: llama.cpp's `llama`
vocabulary (gsq.export.gguf_tokenizer).

A tiny SentencePiece BPE model like Llama 2's (byte fallback, digits split, 1,000 pieces, trained on
the bundled book in a fraction of a second) is given, as transformers converts it, to tiny random
models (with two added tokens, one special) in the two tokenizer.json layouts such models come
with:
  * "legacy": a Prepend + Replace normalizer (Llama 2 and Mistral v0.1 as shipped), on a Llama;
  * "metaspace": a Metaspace pre-tokenizer, prepend scheme 'first' (Mistral v0.3, and what
    transformers 5 makes of a Llama tokenizer), on a Mistral;
each with a model vocabulary rounded up past the tokenizer's, quantized by RTN and exported
(`export_gguf`, as `gsq export --format gguf` does). Checked:
  * the keys llama.cpp's converter writes for such a tokenizer (added tokens, padding);
  * llama.cpp tokenizes ASCII, digits, accents, characters that need the byte fallback, leading
    spaces and newlines to the ids the HF tokenizer gives (BOS first) and decodes them back to the
    text; a text that begins with a space gets one ▁ more than under a 'first' Metaspace, as
    sentencepiece itself gives it (true of any llama.cpp conversion of such a tokenizer); added
    tokens stay whole;
  * llama.cpp's perplexity agrees within 0.5% with `gsq eval FILE.gguf --numerics llama.cpp`;
  * a directory with only the tokenizer.model converts through sentencepiece to the same ids
    (without the sentencepiece package: a one-line error naming it).
Negative controls: the scores gguf.LlamaHfVocab gives (all equal) make llama.cpp split a sentence
otherwise, and byte tokens not typed BYTE decode as their names. Tokenizers llama.cpp would run
differently (WordPiece, Unigram, SentencePiece with other steps) are refused before any weight
loads, in one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_gguf_archs import (  # noqa: F401  (texts: a fixture)
    MAX_TOKENS,
    SEQLEN,
    _quantize,
    numerics_vs_llamacpp,
    peaked_model_dir,
    texts,
)

from gsq.errors import GSQError
from gsq.export import gguf_tokenizer
from gsq.export.gguf_file import export_gguf, write_base_gguf
from gsq.export.gguf_tokenizer import hf_tokenizer_kind
from gsq.gguf import field_value, read_gguf

VOCAB, N_VOCAB = 1000, 1008  # the SentencePiece pieces; the model's vocabulary, rounded up
ADDED = ("[INST]", "<think>")  # added to the HF tokenizer after the pieces: special, and not
UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6  # llama.cpp token types
LAYOUTS = {"legacy": "llama", "metaspace": "mistral"}  # tokenizer.json layout -> architecture
TEXTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "In 1813, 42 copies cost 3 pounds 10.",
    "naïve café, crème brûlée: “quoted” — ok",
    "emoji 😀 and 日本語 take the byte fallback",
    " a leading space",
    "  two leading spaces",
    "lines\n\nand\ttabs\n",
)
SENTENCE, BYTES = TEXTS[0], TEXTS[3]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """tokenizer.model of a SentencePiece BPE model trained as Llama 2's was: byte fallback,
    digits split, no normalization, ▁ put first; unk, bos, eos at ids 0-2."""
    import sentencepiece as spm

    from gsq.data.calibration import bundled_text_path, read_text

    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    with path.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(read_text(bundled_text_path()).splitlines()), model_writer=f,
            model_type="bpe", vocab_size=VOCAB, byte_fallback=True, split_digits=True,
            character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return path


def _processor(sp_model: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model))


def hf_tokenizer(sp_model: Path, layout: str):
    """The fast tokenizer transformers makes of `sp_model`: its pieces, as merges every split of a
    piece into two pieces (best piece score first), byte fallback, BOS added; spaces written as
    ▁ by `layout`; then the ADDED tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from tokenizers.pre_tokenizers import Metaspace
    from transformers import PreTrainedTokenizerFast

    sp = _processor(sp_model)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = sorted(((p[:k], p[k:]) for p in pieces[259:] for k in range(1, len(p))
                     if p[:k] in vocab and p[k:] in vocab),
                    key=lambda m: (-sp.get_score(vocab[m[0] + m[1]]), vocab[m[0]], vocab[m[1]]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))
    if layout == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in (*pieces[:3], ADDED[0])])
    backend.add_tokens([AddedToken(ADDED[1], normalized=False, special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def exported(sp_model, texts, tmp_path_factory):  # noqa: F811
    """Factory: layout -> {'hf', 'qdir', 'gguf'} (cached)."""
    cache: dict[str, dict] = {}

    def make(layout: str) -> dict:
        if layout not in cache:
            root = tmp_path_factory.mktemp(f"spm-{layout}")
            hf = peaked_model_dir(LAYOUTS[layout], hf_tokenizer(sp_model, layout), root / "hf",
                                  vocab_size=N_VOCAB)
            qdir = _quantize(hf, root / "q", texts["calib"])
            export_gguf(qdir, root / "q.gguf")
            cache[layout] = {"hf": hf, "qdir": qdir, "gguf": root / "q.gguf"}
        return cache[layout]

    return make


@contextmanager
def vocab_only(llama_cpp, path: Path):
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def mismatches(llama_cpp, path: Path, sp_model: Path) -> dict[str, list[str]]:
    """The texts llama.cpp tokenizes otherwise than sentencepiece ('tokenize', BOS first), and
    those whose sentencepiece ids it decodes to another text ('decode')."""
    sp = _processor(sp_model)
    found: dict[str, list[str]] = {"tokenize": [], "decode": []}
    with vocab_only(llama_cpp, path) as llm:
        for text in TEXTS:
            ids = [sp.bos_id(), *sp.encode(text)]
            if llm.tokenize(text.encode(), add_bos=True, special=False) != ids:
                found["tokenize"].append(text)
            if llm.detokenize(ids) != text.encode():
                found["decode"].append(text)
    return {check: failing for check, failing in found.items() if failing}


def _tokenizer_keys(path: Path) -> dict:
    fields, _ = read_gguf(path)
    return {k: field_value(f) for k, f in fields.items() if k.startswith("tokenizer.")}


# --------------------------------------------------------------------------------------------
# The files


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_file_has_llamacpps_sentencepiece_vocabulary(exported, sp_model, layout):
    """As llama.cpp's converter writes it: no pre-tokenizer name and no merges, one score and
    type per token (added tokens CONTROL if special, else USER_DEFINED), the rounded-up
    vocabulary padded with unused [PAD{id}] tokens."""
    from gsq.api import check_source_architecture
    from gsq.config import QuantizeConfig

    keys = _tokenizer_keys(exported(layout)["gguf"])
    tokens, scores = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.scores"]
    types = keys["tokenizer.ggml.token_type"]
    assert keys["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in keys and "tokenizer.ggml.merges" not in keys
    assert len(tokens) == len(scores) == len(types) == N_VOCAB
    assert tokens[:VOCAB] == [_processor(sp_model).id_to_piece(i) for i in range(VOCAB)]
    assert tokens[VOCAB:] == [*ADDED, *(f"[PAD{i}]" for i in range(VOCAB + 2, N_VOCAB))]
    assert types[:3] == [CONTROL] * 3 and types[3:259] == [BYTE] * 256
    assert types[VOCAB:] == [CONTROL, USER_DEFINED, *[UNUSED] * (N_VOCAB - VOCAB - 2)]
    assert {k.removeprefix("tokenizer.ggml."): v for k, v in keys.items()
            if k.endswith(("_id", "_token", "_prefix"))} == {
        "unknown_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": True,
        "add_eos_token": False, "add_space_prefix": True}
    assert hf_tokenizer_kind(exported(layout)["qdir"]) == "llama"
    check_source_architecture(str(exported(layout)["hf"]), QuantizeConfig(), ("gguf",))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llamacpp_tokenizes_as_the_hf_tokenizer(llama_cpp, exported, sp_model, layout):
    """llama.cpp gives the ids of HF's tokenizer (the one gsq quantized and evaluates with) and
    decodes them back to the text. A 'first' Metaspace puts no ▁ before a text that begins with
    a space, llama.cpp puts one as sentencepiece does: HF then gives sentencepiece's ids of the
    text without its first space."""
    from transformers import AutoTokenizer

    hf, sp = AutoTokenizer.from_pretrained(exported(layout)["qdir"]), _processor(sp_model)
    assert {sp.id_to_piece(i) for i in sp.encode(BYTES)} >= {"<0xF0>", "<0x9F>", "<0x98>"}
    with vocab_only(llama_cpp, exported(layout)["gguf"]) as llm:
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            if layout == "metaspace" and text.startswith(" "):
                assert ids == [1, *sp.encode(text)], text
                assert hf(text)["input_ids"] == [1, *sp.encode(text[1:])], text
            else:
                assert ids == hf(text)["input_ids"], text
            assert llm.detokenize(ids) == text.encode(), text
        for i, token in enumerate(ADDED, VOCAB):  # whole (CONTROL ones with special=True)
            assert llm.tokenize(token.encode(), add_bos=False, special=True) == \
                hf(token, add_special_tokens=False)["input_ids"] == [i], token


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llamacpp_agrees_with_gsq_llamacpp_numerics(llama_cpp, exported, texts, layout):  # noqa: F811
    """Also: the tokenizer gsq reads from the file (transformers rebuilds its merges from the
    scores) gives HF's ids to a text that does not begin with a space."""
    from transformers import AutoTokenizer

    from gsq.models.loading import load_base_model

    path = exported(layout)["gguf"]
    model, tokenizer = load_base_model(path)
    hf = AutoTokenizer.from_pretrained(exported(layout)["qdir"])
    for text in (t for t in TEXTS if not t.startswith(" ")):
        assert tokenizer(text)["input_ids"] == hf(text)["input_ids"], text
    types = {t.name: t.type_name for t in read_gguf(path)[1]}
    result = numerics_vs_llamacpp(path, types, model, tokenizer, texts["eval"])
    assert result["tokens"] == MAX_TOKENS - MAX_TOKENS // SEQLEN
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=5e-3), result
    assert result["kl"] < 1e-2 and result["top1"] > 0.95, result


def test_a_lone_tokenizer_model_converts_through_sentencepiece(llama_cpp, exported, sp_model,
                                                              tmp_path):
    """Without tokenizer.json, gguf.SentencePieceVocab reads tokenizer.model: sentencepiece's own
    scores and types (unk UNKNOWN), the same ids in llama.cpp."""
    copy = tmp_path / "q"
    shutil.copytree(exported("legacy")["qdir"], copy)
    (copy / "tokenizer.json").unlink()
    shutil.copy(sp_model, copy / "tokenizer.model")
    assert hf_tokenizer_kind(copy) == "llama"
    export_gguf(copy, tmp_path / "sp.gguf")
    keys, sp = _tokenizer_keys(tmp_path / "sp.gguf"), _processor(sp_model)
    assert keys["tokenizer.ggml.scores"][:VOCAB] == [sp.get_score(i) for i in range(VOCAB)]
    assert keys["tokenizer.ggml.token_type"][:4] == [UNKNOWN, CONTROL, CONTROL, BYTE]
    assert keys["tokenizer.ggml.tokens"][:VOCAB] == _tokenizer_keys(exported("legacy")["gguf"])[
        "tokenizer.ggml.tokens"][:VOCAB]
    assert mismatches(llama_cpp, tmp_path / "sp.gguf", sp_model) == {}


def test_a_lone_tokenizer_model_without_sentencepiece_is_a_user_error(sp_model, tmp_path,
                                                                        monkeypatch):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    with pytest.raises(GSQError, match="needs the sentencepiece package: pip install "):
        gguf_tokenizer.tokenizer_kv_from_hf(tmp_path, N_VOCAB)


# --------------------------------------------------------------------------------------------
# Negative controls: the checks above notice wrong scores or types


def _equal_scores(mp):
    mp.setattr(gguf_tokenizer, "_merge_scores", lambda spec: {})


def _bytes_typed_normal(mp):
    from gguf import TokenType
    from gguf.vocab import LlamaHfVocab

    mp.setattr(LlamaHfVocab, "get_token_type", lambda self, i, text, special:
               TokenType.CONTROL if i in special else TokenType.NORMAL)


@pytest.mark.parametrize("patch, check, text", [
    (_equal_scores, "tokenize", SENTENCE),
    (_bytes_typed_normal, "decode", BYTES),
])
def test_wrong_scores_or_types_disagree(llama_cpp, exported, sp_model, tmp_path, monkeypatch,
                                        patch, check, text):
    """With every score equal (gguf.LlamaHfVocab's -1000) llama.cpp joins pairs left to right,
    not in merge order; byte tokens typed NORMAL decode as their names ('<0xF0>')."""
    with monkeypatch.context() as mp:
        patch(mp)
        export_gguf(exported("legacy")["qdir"], tmp_path / "bad.gguf")
    found = mismatches(llama_cpp, tmp_path / "bad.gguf", sp_model)
    assert text in found.get(check, []), found


# --------------------------------------------------------------------------------------------
# Refusals, before any weight is loaded

_SPM_MODEL = {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}
_SPM_DECODER = {"type": "Sequence", "decoders": []}


@pytest.mark.parametrize("spec, needle", [
    ({"model": {"type": "WordPiece", "vocab": {}}, "decoder": {"type": "WordPiece"}},
     "cannot convert this WordPiece tokenizer to GGUF: GGUF export converts byte-level BPE"),
    ({"model": {"type": "Unigram", "vocab": []}, "decoder": {"type": "Metaspace"}},
     "cannot convert this Unigram tokenizer"),
    ({"model": _SPM_MODEL, "decoder": _SPM_DECODER, "pre_tokenizer": {"type": "Digits"}},
     "with Digits pre-tokenizer steps"),
    ({"model": _SPM_MODEL, "decoder": _SPM_DECODER, "normalizer": {"type": "NFKC"}},
     "with NFKC steps"),
])
def test_unconvertible_tokenizers_are_refused_before_weights_load(tmp_path, spec, needle):
    """The folder has a config and a tokenizer but no weights: a later refusal would name those."""
    from gsq.api import quantize
    from gsq.config import QuantizeConfig
    from gsq.models.synthetic import random_config

    source = tmp_path / "hf"
    random_config("llama", 32).save_pretrained(source)
    (source / "tokenizer.json").write_text(json.dumps(spec))
    for run in (lambda: quantize(str(source), QuantizeConfig(), out=tmp_path / "q",
                                 progress=False, export_formats=("gguf",)),
                lambda: quantize(str(source), QuantizeConfig().targeting("Q4_0"),
                                 out=tmp_path / "q", progress=False),
                lambda: write_base_gguf(str(source), tmp_path / "x.gguf")):
        with pytest.raises(GSQError, match=needle) as err:
            run()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "q").exists() and not (tmp_path / "x.gguf").exists()


def test_byte_level_tokenizers_still_convert(tiny_llama_dir):
    assert hf_tokenizer_kind(tiny_llama_dir) == "gpt2"
