"""Memory-map the arrays of a ``.safetensors`` file as read-only numpy arrays, without reading them.

``safetensors.numpy.load_file`` copies every tensor into memory. A safetensors file is an 8-byte little-endian
header length, a JSON header (dtype, shape and byte range of each tensor) and the raw little-endian bytes, so each
tensor can be opened with `numpy.memmap` at its offset: the operating system then reads only the pages a search
touches, and they count as page cache (evictable, shared between processes), not as the process's own memory.

Example:

```python
>>> import tempfile
>>> import numpy as np
>>> from safetensors.numpy import save_file
>>> from hf_ext.retrieval.memmap import memmap_safetensors
>>> with tempfile.TemporaryDirectory() as folder:
...     save_file({"scores": np.arange(6, dtype=np.float16).reshape(2, 3)}, f"{folder}/index.safetensors")
...     scores = memmap_safetensors(f"{folder}/index.safetensors")["scores"]
...     print(type(scores).__name__, scores.dtype, scores[1].tolist())
memmap float16 [3.0, 4.0, 5.0]

```
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# safetensors dtype names -> numpy (bfloat16 has no numpy dtype; the CUR index never stores it)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip

__all__ = ["memmap_safetensors"]


def memmap_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path`` as a read-only `numpy.memmap` (empty tensors as arrays).

    Raises:
        `ValueError`: the file is not safetensors, or holds a dtype numpy cannot map (bfloat16).
    """
    path = Path(path)
    with path.open("rb") as file:
        size_bytes = file.read(8)
        if len(size_bytes) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (header_size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON).") from error
    header.pop("__metadata__", None)
    start = 8 + header_size
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"Tensor {name!r} of {path} is {info['dtype']}, which numpy cannot memory-map: load the "
                             f"file with safetensors instead.")  # fmt: skip
        dtype, shape = np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end == begin:  # numpy cannot map zero bytes
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=start + begin, shape=shape)
    return arrays
