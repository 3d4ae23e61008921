"""The one table of tensor types: numpy name <-> Triton config type <-> gRPC wire type.

Kept free of heavy imports: every Python-backend stub imports it at start-up.
"""

from __future__ import annotations

import numpy as np

# numpy dtype name -> Triton data type. "string" is Triton's BYTES/STRING type.
TRITON_DTYPES: dict[str, str] = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "string": "TYPE_STRING",
}
NUMPY_DTYPES = {v: k for k, v in TRITON_DTYPES.items()}


def numpy_dtype(triton_type: str) -> type:
    """Triton config type -> numpy dtype (object for strings, as pb_utils expects)."""
    name = NUMPY_DTYPES[triton_type]
    return np.object_ if name == "string" else np.dtype(name).type


def wire_datatype(array: np.ndarray) -> str:
    """The datatype tritonclient's InferInput takes for `array`."""
    if array.dtype == object:
        return "BYTES"
    return TRITON_DTYPES[array.dtype.name].removeprefix("TYPE_")
