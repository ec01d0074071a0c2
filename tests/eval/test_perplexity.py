"""Tests for gsq.eval.perplexity and gsq.eval.kl on a tiny random Llama (CPU, no files)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gsq.errors import GSQError
from gsq.eval.kl import compare_with_base
from gsq.eval.perplexity import eval_windows, perplexity

VOCAB = 320


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2,  # large weights: peaked, non-uniform next-token distributions
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(1))


def _reference_logp(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """float64 next-token log-probs [n, seqlen-1, vocab], all windows in one batch."""
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.double(), dim=-1)


def test_eval_windows_counting(tokens: torch.Tensor) -> None:
    w = eval_windows(tokens, 64)
    assert w.shape == (15, 64)  # 1000 // 64, tail of 40 dropped
    assert torch.equal(w.flatten(), tokens[:960])
    assert eval_windows(tokens, 64, max_tokens=300).shape == (4, 64)  # floor(300 / 64)
    assert eval_windows(tokens, 64, max_tokens=10_000).shape == (15, 64)


@pytest.mark.parametrize(
    ("n", "seqlen", "max_tokens", "match"),
    [(50, 64, None, "50 tokens, fewer than one window of 64"),
     (1000, 64, 63, "max_tokens 63 is less than one window"),
     (1000, 1, None, "at least 2")],
)
def test_eval_windows_errors(n: int, seqlen: int, max_tokens: int | None, match: str) -> None:
    with pytest.raises(GSQError, match=match):
        eval_windows(torch.arange(n), seqlen, max_tokens)


def test_perplexity_matches_hand_computation(model, tokens) -> None:
    seqlen = 64
    result = perplexity(model, tokens, seqlen, max_tokens=500, progress=False)
    windows = tokens[: 7 * seqlen].view(7, seqlen)  # floor(500 / 64) = 7 windows
    logp = _reference_logp(model, windows)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()

    assert result["windows"] == 7
    assert result["tokens"] == 7 * 63
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert 1.0 < result["ppl"] < 10 * VOCAB


def test_perplexity_ignores_tail_and_uses_window_start(model, tokens) -> None:
    base = perplexity(model, tokens, 64, progress=False)
    changed_tail = tokens.clone()
    changed_tail[960:] = (changed_tail[960:] + 1) % VOCAB  # beyond the last full window
    assert perplexity(model, changed_tail, 64, progress=False)["nll"] == pytest.approx(base["nll"])
    changed_body = tokens.clone()
    changed_body[100] = (changed_body[100] + 1) % VOCAB
    assert perplexity(model, changed_body, 64, progress=False)["nll"] != pytest.approx(base["nll"])


def test_perplexity_restores_training_flag(model, tokens) -> None:
    model.train()
    try:
        perplexity(model, tokens, 64, max_tokens=128, progress=False)
        assert model.training
    finally:
        model.eval()


def test_compare_with_itself(model, tokens) -> None:
    r = compare_with_base(model, model, tokens, 64, max_tokens=256, progress=False)
    assert r["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1"] == 1.0
    assert r["ppl"] == pytest.approx(r["base_ppl"], rel=1e-7)
    assert (r["windows"], r["tokens"]) == (4, 4 * 63)
    alone = perplexity(model, tokens, 64, max_tokens=256, progress=False)
    assert r["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)


def test_compare_with_perturbed_copy(model, tokens) -> None:
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    for p in noisy.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))

    seqlen = 64
    r = compare_with_base(noisy, model, tokens, seqlen, max_tokens=320, progress=False)
    windows = tokens[: 5 * seqlen].view(5, seqlen)
    logq = _reference_logp(noisy, windows)  # [5, 63, vocab]
    logb = _reference_logp(model, windows)
    kl = (logb.exp() * (logb - logq)).sum(-1).mean().item()  # KL(base || model)
    top1 = (logq.argmax(-1) == logb.argmax(-1)).double().mean().item()

    assert r["kl"] > 1e-3
    assert r["kl"] == pytest.approx(kl, rel=1e-4)
    assert r["top1"] == pytest.approx(top1)
    assert r["top1"] < 1.0
    assert r["base_ppl"] == pytest.approx(
        perplexity(model, tokens, seqlen, max_tokens=320, progress=False)["ppl"], rel=1e-6)
    assert r["ppl"] == pytest.approx(
        perplexity(noisy, tokens, seqlen, max_tokens=320, progress=False)["ppl"], rel=1e-6)


def test_compare_text_too_short(model) -> None:
    with pytest.raises(GSQError, match="fewer than one window"):
        compare_with_base(model, model, torch.arange(30), 64, progress=False)
