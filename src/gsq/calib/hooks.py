"""Context managers that attach forward hooks to a block's linears and always remove them."""

from __future__ import annotations

from gsq.models.base import collect_linear_hessians as collect_hessians

__all__ = ["collect_hessians"]
