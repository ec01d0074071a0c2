"""Kernel tests run the Triton kernels through the interpreter on CPU tensors when no GPU is
present. TRITON_INTERPRET must be set before the kernel module is imported (triton decides at
`@triton.jit` time), so it is set here, when pytest loads this conftest, ahead of the tests."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
