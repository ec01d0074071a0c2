"""Calibration windows: the calibration spec tokenized once, cut into seeded, disjoint windows."""

from __future__ import annotations

import torch

from gsq.config import QuantizeConfig


def calibration_tokens(tokenizer, calib: str | None, chat_template: bool = False):
    """The calibration spec (`gsq.data.calibration.parse_calib_spec`: files, folders, parts of
    the bundled mix, datasets, with proportions; None = the bundled mix) tokenized once per
    source: a 1-D LongTensor for a single source, else a `TokenMix`. With `chat_template`, the
    text is rendered as conversations in the tokenizer's chat template first."""
    from gsq.data.calibration import load_calibration_mix

    mix = load_calibration_mix(tokenizer, calib, chat_template)
    return mix.parts[0][1] if len(mix.parts) == 1 else mix


def calibration_windows(tokens, cfg: QuantizeConfig,
                        test: int | None = None) -> dict[str, torch.Tensor]:
    """Seeded, disjoint train/val/gptq windows `(n, seqlen)` cut from the token stream (or from
    each source of a `TokenMix` in proportion); with `test`, also up to `test` held-out "test"
    windows from what is left (none if the text is too short)."""
    from gsq.data.calibration import cut_windows, window_capacity

    counts = {"train": cfg.nsamples, "val": cfg.val_samples, "gptq": cfg.gptq_samples}
    if test is not None:
        spare = window_capacity(tokens, cfg.seqlen) - sum(counts.values())
        counts["test"] = max(0, min(test, spare))
    return cut_windows(tokens, counts, cfg.seqlen, cfg.seed)
