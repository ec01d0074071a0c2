"""One evaluation for the CLI, the demo, the benchmarks and the tests: perplexity of a model on a
text, and with a base model its KL divergence and top-1 agreement (`evaluate`).

The model is a source (a gsq quantized directory, a Hugging Face id or folder, a `.gguf` file, the
demo alias) or a model in memory. A `.gguf` model runs in transformers (exact fp32; types its GGUF
reader lacks decoded by gsq), with llama.cpp's numerics emulated (`numerics="llama.cpp"`), or in
llama.cpp itself (`engine="llama.cpp"`, llama-cpp-python, CPU).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError

ENGINES = ("auto", "transformers", "llama.cpp")
NUMERICS = ("exact", "llama.cpp")


def choose_engine(engine: str, model: Any) -> str:
    """'transformers' or 'llama.cpp' for a model (auto is transformers for every model: gsq reads
    every GGUF type it writes, Q2_0 included, `gsq.models.gguf_decoded`)."""
    if engine not in ENGINES:
        raise GSQError(f"engine must be one of {', '.join(ENGINES)}; got '{engine}'")
    if engine == "llama.cpp" and not _is_gguf(model):
        raise GSQError(f"--engine llama.cpp needs a .gguf model file; got '{model}'")
    return "transformers" if engine == "auto" else engine


EVAL_DTYPES = ("float32", "bfloat16")


def _is_gguf(model: Any) -> bool:
    return isinstance(model, (str, Path)) and str(model).lower().endswith(".gguf")


def _tokens(text: str | Path | torch.Tensor, tokenizer) -> torch.Tensor:
    """A text file tokenized, or token ids `[N]` as they are."""
    from gsq.data.calibration import read_text, tokenize_text

    if isinstance(text, torch.Tensor):
        return text
    return tokenize_text(tokenizer, read_text(str(text)))


def evaluate(model: Any, text: str | Path | torch.Tensor, *, tokenizer: Any = None,
             base: Any = None, seqlen: int = 2048, max_tokens: int | None = None,
             device: str = "cpu", progress: bool = True, engine: str = "auto",
             numerics: str = "exact", dtype: str = "float32") -> dict:
    """Perplexity of `model` on `text`; with `base`, also KL(base || model) and top-1 agreement.

    model: a model source (`gsq quantize`'s, or a quantized directory) or a causal LM in memory.
    text: a text file, or token ids `[N]` (then no tokenizer is needed).
    tokenizer: the tokenizer of an in-memory model (a source's own is used otherwise); with
    engine "llama.cpp", a model source whose HF tokenizer tokenizes the text.
    base: a model source or a causal LM in memory.
    dtype: "float32" (exact, the default) or "bfloat16" (model sources and base loaded in bf16:
    half the memory, and bf16 matmuls; logits are taken in fp32 either way).
    Returns `gsq.eval.perplexity.perplexity`'s dict, or `gsq.eval.kl.compare_with_base`'s.
    """
    if numerics not in NUMERICS:
        raise GSQError(f"numerics must be one of {', '.join(NUMERICS)}; got '{numerics}'")
    if dtype not in EVAL_DTYPES:
        raise GSQError(f"dtype must be one of {', '.join(EVAL_DTYPES)}; got '{dtype}'")
    if choose_engine(engine, model) == "llama.cpp":
        if numerics != "exact":
            raise GSQError("--numerics applies to the transformers engine only (llama.cpp "
                           "computes with its own numerics)")
        if dtype != "float32":
            raise GSQError("--dtype applies to the transformers engine only")
        return _evaluate_llamacpp(model, text, tokenizer, base, seqlen, max_tokens, device,
                                  progress)
    from gsq.config import resolve_device
    from gsq.eval.kl import compare_with_base
    from gsq.eval.perplexity import perplexity
    from gsq.models.loading import load_any_model

    if isinstance(model, (str, Path)) and tokenizer is not None:
        raise GSQError("--tokenizer applies to the llama.cpp engine only")
    tensor_types = _gguf_tensor_types(model) if numerics == "llama.cpp" else None
    dev = resolve_device(device)
    if numerics == "llama.cpp" and dtype != "float32":
        raise GSQError("--numerics llama.cpp computes in fp32: it takes no --dtype")
    weights = getattr(torch, dtype)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_any_model(str(model), dtype=weights, device=str(dev))
    elif tokenizer is None and not isinstance(text, torch.Tensor):
        raise GSQError("evaluating a model in memory on a text file needs its tokenizer")
    tokens = _tokens(text, tokenizer)
    if isinstance(base, (str, Path)):
        base = load_any_model(str(base), dtype=weights, device=str(dev))[0]
    model.to(dev)
    with _numerics(model, tensor_types):
        if base is None:
            return perplexity(model, tokens, seqlen, max_tokens, device=str(dev),
                              progress=progress)
        return compare_with_base(model, base.to(dev), tokens, seqlen, max_tokens,
                                 device=str(dev), progress=progress)


def _evaluate_llamacpp(model_source: str, text, tokenizer: str | None, base: Any, seqlen: int,
                       max_tokens: int | None, device: str, progress: bool) -> dict:
    """The model (and a .gguf base) run by llama-cpp-python; any other base by transformers on
    `device`. Same windows and metrics as the transformers path."""
    from gsq.config import resolve_device
    from gsq.eval.kl import compare_with_base
    from gsq.eval.llamacpp import LlamaCppModel, check_same_vocab, load_eval_tokenizer
    from gsq.eval.perplexity import perplexity
    from gsq.models.loading import load_any_model

    model = LlamaCppModel(model_source, n_ctx=seqlen)
    tokens = _tokens(text, load_eval_tokenizer(str(model_source), tokenizer)
                     if not isinstance(text, torch.Tensor) else None)
    if base is None:
        return perplexity(model, tokens, seqlen, max_tokens, device="cpu", progress=progress)
    dev = resolve_device(device)
    if _is_gguf(base):
        base, dev = LlamaCppModel(base, n_ctx=seqlen), resolve_device("cpu")
    elif isinstance(base, (str, Path)):
        base = load_any_model(str(base), device=str(dev))[0]
    check_same_vocab(model, base)
    return compare_with_base(model, base, tokens, seqlen, max_tokens, device=str(dev),
                             progress=progress)


def _gguf_tensor_types(model_source: Any) -> dict:
    """GGUF tensor name -> type of the .gguf file `numerics="llama.cpp"` emulates."""
    from gsq.gguf import read_gguf

    if not _is_gguf(model_source):
        raise GSQError(f"--numerics llama.cpp needs a .gguf model (its tensor types decide how "
                       f"llama.cpp rounds activations); got '{model_source}'")
    return {t.name: t.type_name for t in read_gguf(model_source)[1]}


def _numerics(model, tensor_types: dict | None):
    """A context in which `model` computes as llama.cpp would run a file with `tensor_types`
    (None: unchanged, exact fp32)."""
    if tensor_types is None:
        return contextlib.nullcontext()
    from gsq.eval.llamacpp_numerics import linear_roundings, llamacpp_numerics

    return llamacpp_numerics(model, linear_roundings(model, tensor_types))
