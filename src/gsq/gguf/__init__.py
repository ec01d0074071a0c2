"""The GGUF layer, at the bottom of gsq's import graph (numpy, torch, the `gguf` package and
`gsq.errors` only): the table of tensor types (`types`), their byte layouts (`layouts`) and codec
(`codec`), the reader (`reader`), llama.cpp architectures with their keys, tensor names and row
orders (`arch`), and the writer (`writer`). Fitting gsq's weights onto the types lives above, in
`gsq.export`."""

from gsq.gguf.arch import (
    ARCHITECTURES,
    ROPE_FREQS,
    SUPPORTED_MODEL_TYPES,
    Architecture,
    HParams,
    always_f32,
    architecture,
    check_file_hparams,
    expert_slice,
    extra_tensors,
    file_hparams,
    hf_config,
    hf_values,
    match_slots,
    match_tensors,
    model_hparams,
    permute_rows,
    qk_heads,
    rotary_rows,
    tensor_name,
    tensor_slot,
)
from gsq.gguf.codec import (
    Assignment,
    decode_assignment,
    decode_tensor,
    decode_weight,
    encode_assignment,
)
from gsq.gguf.reader import GGUFTensor, field_value, missing_types, read_gguf, tensor_offsets
from gsq.gguf.types import (
    FLOAT_TYPES,
    QK_K,
    TYPES,
    GGUFType,
    file_type,
    gguf_type,
    package_lacks,
    row_bytes,
    type_id,
    type_name,
)
from gsq.gguf.writer import KeyValue, TensorInfo, metadata_only_gguf, write_model_file

__all__ = [
    "ARCHITECTURES", "FLOAT_TYPES", "QK_K", "ROPE_FREQS", "SUPPORTED_MODEL_TYPES", "TYPES",
    "Architecture", "Assignment", "GGUFTensor", "GGUFType", "HParams", "KeyValue", "TensorInfo",
    "always_f32", "architecture", "check_file_hparams", "decode_assignment", "decode_tensor",
    "decode_weight", "encode_assignment", "expert_slice", "extra_tensors", "field_value",
    "file_hparams", "file_type", "gguf_type", "hf_config", "hf_values", "match_slots",
    "match_tensors",
    "metadata_only_gguf", "missing_types", "model_hparams", "package_lacks", "permute_rows",
    "qk_heads", "read_gguf", "rotary_rows", "row_bytes", "tensor_name", "tensor_offsets",
    "tensor_slot", "type_id", "type_name", "write_model_file",
]
