"""Exports of a gsq quantized directory to the formats engines run: GGUF and compressed-tensors."""
