"""`gsq refine`: GSQ on the codes of an existing llama.cpp GGUF file, written back in the same
types (see `gsq.refine.run`)."""

from gsq.refine.run import RefineResult, refine_gguf, report_path

__all__ = ["RefineResult", "refine_gguf", "report_path"]
