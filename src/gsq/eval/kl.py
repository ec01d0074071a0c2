"""How far a (quantized) model's predictions are from its base model's, on a token stream.

One pass over the same evaluation windows as `gsq.eval.perplexity` (see there for the protocol).
For each window both models run, and at every predicted position we compare the two next-token
distributions: KL(base || model), whether their argmax tokens agree, and each model's NLL of the
true next token. Only one window's logits of each model are alive at a time (2048 x 49152 fp32
logits are 400 MB).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gsq.eval.perplexity import eval_mode, eval_windows, window_logits

log = logging.getLogger(__name__)

_ROWS_PER_STEP = 512  # positions per log_softmax step: bounds the temporaries to ~100 MB each


def compare_with_base(
    model: Any,
    base_model: Any,
    tokens: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity of both models, mean KL(base || model) and top-1 agreement on `tokens` [N].

    Both models live on `device`. Returns {"ppl", "base_ppl", "nll", "base_nll", "kl", "top1",
    "tokens" (predicted tokens), "windows"}; kl is in nats per predicted token, top1 in [0, 1].
    """
    windows = eval_windows(tokens, seqlen, max_tokens)  # [n, seqlen]
    sums = torch.zeros(4, dtype=torch.float64)  # nll, base_nll, kl, top1 agreements
    with eval_mode(model, base_model), torch.inference_mode():
        for window in tqdm(windows, desc="compare", unit="window", disable=not progress):
            logits = window_logits(model, window, device)  # [seqlen-1, vocab] fp32
            base_logits = window_logits(base_model, window, device)
            targets = window[1:].to(logits.device)  # [seqlen-1]
            sums += _window_sums(logits, base_logits.to(logits.device), targets)
            del logits, base_logits

    n_pred = windows.shape[0] * (seqlen - 1)
    nll, base_nll, kl, agree = (sums / n_pred).tolist()
    result = {
        "ppl": math.exp(nll),
        "base_ppl": math.exp(base_nll),
        "nll": nll,
        "base_nll": base_nll,
        "kl": kl,
        "top1": agree,
        "tokens": n_pred,
        "windows": windows.shape[0],
    }
    log.info(
        "ppl %.4f (base %.4f), KL %.5f, top-1 agreement %.4f over %s tokens",
        result["ppl"], result["base_ppl"], kl, agree, f"{n_pred:,}",
    )
    return result


def _window_sums(
    logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sums over one window's positions: [nll, base_nll, KL(base || model), argmax agreements].

    logits, base_logits: fp32 [P, vocab]; targets: [P]. Returns float64 [4].
    """
    sums = torch.zeros(4, dtype=torch.float64)
    for lo in range(0, logits.shape[0], _ROWS_PER_STEP):
        rows = slice(lo, lo + _ROWS_PER_STEP)
        logp = F.log_softmax(logits[rows], dim=-1)  # [p, vocab]
        base_logp = F.log_softmax(base_logits[rows], dim=-1)
        tgt = targets[rows].unsqueeze(1)  # [p, 1]
        # KL(base || model) = sum_v p_base(v) * (log p_base(v) - log p_model(v)), per position.
        kl = F.kl_div(logp, base_logp, log_target=True, reduction="sum")
        agree = (logits[rows].argmax(-1) == base_logits[rows].argmax(-1)).sum()
        sums += torch.stack([
            -logp.gather(1, tgt).sum().double(),
            -base_logp.gather(1, tgt).sum().double(),
            kl.double(),
            agree.double(),
        ]).cpu()
    return sums
