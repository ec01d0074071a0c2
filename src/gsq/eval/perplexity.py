"""Perplexity of a finished model on a token stream (forward passes only).

Protocol, as in GPTQ and its successors: the whole evaluation text is tokenized once
(`gsq.data.calibration.tokenize_text`, no BOS), cut into non-overlapping windows of `seqlen` tokens
(the tail is dropped), optionally capped at the first `max_tokens` tokens, and every window is run
on its own. Each window predicts its tokens 1..seqlen-1 from the ones before; perplexity is exp of
the mean next-token negative log-likelihood over all those predictions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gsq.errors import GSQError

log = logging.getLogger(__name__)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping evaluation windows: LongTensor [n_windows, seqlen].

    tokens: LongTensor [N]. With `max_tokens`, only the first max_tokens tokens are used, i.e.
    floor(max_tokens / seqlen) windows.
    """
    if tokens.dim() != 1:
        raise GSQError(f"token stream must be 1-D, got shape {tuple(tokens.shape)}")
    if seqlen < 2:
        raise GSQError(f"evaluation window must be at least 2 tokens, got {seqlen}")
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise GSQError(f"max_tokens {max_tokens:,} is less than one window of {seqlen}")
        tokens = tokens[:max_tokens]
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise GSQError(
            f"evaluation text has {tokens.numel():,} tokens, fewer than one window of {seqlen}"
        )
    return tokens[: n_windows * seqlen].view(n_windows, seqlen)


def window_logits(model: Any, window: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """fp32 next-token logits of one window: [seqlen - 1, vocab] (the last position predicts
    nothing inside the window and is dropped)."""
    out = model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    return out.logits[0, :-1].float()


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the block, then restore their training flags."""
    was_training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, flag in zip(models, was_training, strict=True):
            m.train(flag)


def perplexity(
    model: Any,
    tokens: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity of `model` on `tokens` (LongTensor [N]).

    `device` is where the model lives; windows are moved there one at a time.
    Returns {"ppl", "nll" (mean per predicted token), "tokens" (predicted tokens), "windows"}.
    """
    windows = eval_windows(tokens, seqlen, max_tokens)  # [n, seqlen]
    total_nll = 0.0  # python float (double): no fp32 drift over ~10^6 terms
    with eval_mode(model), torch.inference_mode():
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            logits = window_logits(model, window, device)  # [seqlen-1, vocab] fp32
            targets = window[1:].to(logits.device)  # [seqlen-1]
            total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
    n_pred = windows.shape[0] * (seqlen - 1)
    nll = total_nll / n_pred
    log.info("perplexity %.4f over %s tokens (%d windows)", math.exp(nll), f"{n_pred:,}",
             len(windows))
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_pred, "windows": windows.shape[0]}
