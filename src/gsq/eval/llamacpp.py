"""Perplexity, KL and top-1 agreement computed by llama.cpp (through llama-cpp-python), and
llama.cpp's own quantizer for the baselines (spec: formats.md C).

Same protocol as `gsq.eval.perplexity` / `gsq.eval.kl`, by construction: `LlamaCppModel` looks like
the slice of a transformers causal LM those functions use (`model(input_ids=[1, seqlen]).logits`,
`eval()` / `train()`), so the very same code cuts the windows and sums the losses. Each window is
evaluated from an empty KV cache at position 0, with exactly the given token ids: llama.cpp adds no
BOS (whatever the file's `tokenizer.ggml.add_bos_token` says), just as gsq's token stream has none.
To make the numbers comparable with gsq's, the text is tokenized by an HF tokenizer: by default
the one transformers builds from the GGUF file's own tokenizer keys, which is how gsq tokenizes a
`.gguf` base model.

llama_cpp is imported lazily; without it these functions raise GSQError
(`pip install 'gsq-quant[verify]'`).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from gsq.errors import GSQError

log = logging.getLogger(__name__)

LLAMACPP_REQUIREMENT = "llama-cpp-python>=0.3.36"
BASELINE_FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0")


def import_llama_cpp() -> Any:
    """The llama_cpp module, or GSQError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GSQError(f"llama.cpp evaluation needs the '{LLAMACPP_REQUIREMENT}' package: "
                       f"pip install 'gsq-quant[verify]' ({err})") from None
    return llama_cpp


def _default_threads() -> int:
    return max(1, torch.get_num_threads())


class LlamaCppModel:
    """A GGUF file run by llama.cpp, shaped like a transformers causal LM for `gsq.eval`.

    `model(input_ids=LongTensor[1, n])` returns an object whose `.logits` is fp32 [1, n, vocab]:
    row i holds the logits after token i, computed from a fresh context (no state carried between
    calls). `n` must not exceed `n_ctx`.
    """

    training = False

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None,
                 n_batch: int = 512) -> None:
        from gsq.gguf import read_gguf

        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        read_gguf(self.path)  # GSQError for a missing, truncated or non-GGUF file
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, n_batch),
                logits_all=True, n_threads=n_threads or _default_threads(), verbose=False)
        except (ValueError, RuntimeError, OSError) as err:
            raise GSQError(f"llama.cpp cannot load '{self.path}': {_first_line(err)}") from err
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def eval(self) -> LlamaCppModel:
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        return self

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False, **_: Any):
        """logits fp32 [1, n, vocab] of one sequence `input_ids` [1, n]."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise GSQError(f"llama.cpp evaluates one sequence at a time; got input shape "
                           f"{tuple(input_ids.shape)}")
        ids = input_ids[0].tolist()
        if len(ids) > self.n_ctx:
            raise GSQError(f"{len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            raise GSQError(f"token id {max(ids)} is outside the vocabulary ({self.n_vocab}) of "
                           f"'{self.path}'; was the text tokenized with another tokenizer?")
        self.llm.reset()  # the next eval clears the KV cache from position 0
        self.llm.eval(ids)
        logits = np.array(self.llm.scores[: len(ids)], dtype=np.float32)  # [n, vocab]
        return SimpleNamespace(logits=torch.from_numpy(logits).unsqueeze(0))

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization (no BOS, special tokens as plain text)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        self.llm.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Tokenizer


def gguf_hf_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer transformers builds from a GGUF file's tokenizer keys
    (`gsq.models.gguf_decoded.gguf_tokenizer`)."""
    from gsq.gguf import read_gguf
    from gsq.models.gguf_decoded import gguf_tokenizer

    fields, _ = read_gguf(path)
    if "general.architecture" not in fields or "tokenizer.ggml.tokens" not in fields:
        raise GSQError(f"GGUF file '{path}' has no tokenizer")
    return gguf_tokenizer(Path(path), fields)


def load_eval_tokenizer(gguf_path: str | Path, tokenizer_source: str | None = None) -> Any:
    """The HF tokenizer for evaluating a GGUF file: from `tokenizer_source` (a gsq quantized
    directory, HF folder or id, or another .gguf) if given, else from the file itself."""
    if tokenizer_source is None:
        return gguf_hf_tokenizer(gguf_path)
    if str(tokenizer_source).lower().endswith(".gguf"):
        return gguf_hf_tokenizer(tokenizer_source)
    from transformers import AutoTokenizer

    from gsq.models.loading import resolve_model_source

    source = resolve_model_source(tokenizer_source)
    if source.lower().endswith(".gguf"):
        return gguf_hf_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise GSQError(f"cannot load a tokenizer from '{tokenizer_source}': "
                       f"{_first_line(err)}") from err


# --------------------------------------------------------------------------------------------
# Perplexity and comparison


def llamacpp_perplexity(gguf_path: str | Path, tokens: torch.Tensor, seqlen: int,
                        max_tokens: int | None = None, *, n_threads: int | None = None,
                        progress: bool = True) -> dict[str, float | int]:
    """Perplexity of a GGUF model run by llama.cpp on `tokens` [N] (protocol of
    `gsq.eval.perplexity.perplexity`; same result keys)."""
    from gsq.eval.perplexity import perplexity

    model = LlamaCppModel(gguf_path, n_ctx=seqlen, n_threads=n_threads)
    try:
        return perplexity(model, tokens, seqlen, max_tokens, device="cpu", progress=progress)
    finally:
        model.close()


def llamacpp_compare(gguf_path: str | Path, base: str | Path | Any, tokens: torch.Tensor,
                     seqlen: int, max_tokens: int | None = None, *, n_threads: int | None = None,
                     progress: bool = True) -> dict[str, float | int]:
    """KL(base || model), top-1 agreement and both perplexities (`gsq.eval.kl` protocol and keys).

    base: another .gguf path (run by llama.cpp too), or a transformers model (e.g. gsq's own
    dequantized model, to check what llama.cpp computes against what gsq computes).
    """
    from gsq.eval.kl import compare_with_base

    model = LlamaCppModel(gguf_path, n_ctx=seqlen, n_threads=n_threads)
    base_model = base
    if isinstance(base, str | Path):
        base_model = LlamaCppModel(base, n_ctx=seqlen, n_threads=n_threads)
    check_same_vocab(model, base_model)
    try:
        return compare_with_base(model, base_model, tokens, seqlen, max_tokens, device="cpu",
                                 progress=progress)
    finally:
        model.close()
        if base_model is not base:
            base_model.close()


def vocab_size(model: Any) -> int:
    """Output vocabulary of a LlamaCppModel or a transformers model."""
    if isinstance(model, LlamaCppModel):
        return model.n_vocab
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocab(model: Any, base_model: Any) -> None:
    a, b = vocab_size(model), vocab_size(base_model)
    if a != b:
        raise GSQError(f"the model has {a} output logits and the base model {b}; they cannot be "
                       "compared")


# --------------------------------------------------------------------------------------------
# llama.cpp's own quantizer


def quantize_with_llamacpp(src_gguf: str | Path, dst_gguf: str | Path, ftype_name: str, *,
                           nthread: int | None = None, allow_requantize: bool = False,
                           overwrite: bool = False) -> dict:
    """Quantize a GGUF file with llama.cpp's `llama_model_quantize` (the baselines: Q2_K, Q3_K_M,
    Q4_K_M, Q4_0, or any other `LLAMA_FTYPE_MOSTLY_<name>`).

    The input should be F16/F32/BF16 (e.g. from `write_base_gguf`); an already quantized input
    needs `allow_requantize`. llama.cpp falls back to other types for rows that are not a whole
    number of K-quant blocks (formats.md C.2), so the report lists the types actually produced:
    {"out", "ftype", "file_bytes", "tensor_types", "seconds"}.
    """
    from gsq.gguf import read_gguf
    from gsq.io.quantized_dir import atomic_output_file

    llama_cpp = import_llama_cpp()
    name = ftype_name.strip().upper()
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else
                    f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise GSQError(f"llama.cpp has no quantization type '{ftype_name}' (e.g. "
                       f"{', '.join(BASELINE_FTYPES)})")
    read_gguf(src_gguf)  # GSQError for a missing or broken input, before llama.cpp sees it
    t0 = time.perf_counter()
    with atomic_output_file(dst_gguf, overwrite) as tmp:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = nthread or _default_threads()
        params.allow_requantize = allow_requantize
        rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
        if rc != 0:
            raise GSQError(f"llama.cpp could not quantize '{src_gguf}' to {name} (status {rc}"
                           f"{'' if allow_requantize else '; is the input already quantized?'})")
        _, tensors = read_gguf(tmp)
        size = tmp.stat().st_size
    return {"out": str(dst_gguf), "ftype": name, "file_bytes": size,
            "tensor_types": dict(sorted(Counter(t.type_name for t in tensors).items())),
            "seconds": time.perf_counter() - t0}
