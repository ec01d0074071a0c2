"""Evaluation: perplexity, KL and top-1 agreement against a base model (`evaluate`), in
transformers or llama.cpp."""

from gsq.eval.evaluation import ENGINES, NUMERICS, evaluate

__all__ = ["ENGINES", "NUMERICS", "evaluate"]
