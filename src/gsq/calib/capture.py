"""Capture the inputs of block 0 and the keyword arguments every block is called with
(GPTQ "Catcher").

The model runs up to its first block, whose forward pre-hook records the hidden states
`(batch, seq, hidden)` and raises to stop the forward. The keyword arguments (rotary position
embeddings, attention mask) are captured from a batch-1 call so that they broadcast over any batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gsq.calib.cache import ActivationStore
from gsq.calib.objectives import map_batches
from gsq.models.base import ModelAdapter

# Block kwargs that only matter for generation with a KV cache.
_DROPPED_KWARGS = ("hidden_states", "past_key_values", "past_key_value", "cache", "use_cache",
                   "cache_position", "output_attentions")


class _StopForward(Exception):
    pass


def _run_to_first_block(model: nn.Module, first: nn.Module, ids: Tensor) -> tuple[Tensor, dict]:
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = kwargs
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen["h"].detach(), seen["kwargs"]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, ids: Tensor, device: torch.device,
                         batch_size: int = 8, home: torch.device | None = None,
                         store: ActivationStore | None = None, shard: bool = False) -> Tensor:
    """Hidden states entering block 0 for token ids `(N, T)` -> `(N, T, hidden)` on `home`
    (default `device`), gathered batch by batch into a tensor of `store` on the host (`shard`:
    each process computes its share of the batches, `map_batches`)."""
    first = adapter.blocks(model)[0]
    home = device if home is None else home
    return map_batches(lambda c: _run_to_first_block(model, first, c)[0], ids.to(home),
                       batch_size, device, store, shard)


@torch.no_grad()
def capture_block_context(model: nn.Module, adapter: ModelAdapter, seqlen: int,
                          device: torch.device) -> dict[str, Any]:
    """Keyword arguments of a block call for sequences of `seqlen` tokens
    (batch 1, broadcastable)."""
    ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    _, kwargs = _run_to_first_block(model, adapter.blocks(model)[0], ids)
    return {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
