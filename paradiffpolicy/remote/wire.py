"""Tensors on the wire: dtype + shape + raw little-endian bytes (``policy_service.proto``'s ``Tensor``).

Decoding trusts nothing: the dtype must be one of ``DTYPES``, the shape non-negative with at most
``MAX_RANK`` axes and ``max_elements`` elements, and the byte count exactly what they imply. A bad
tensor raises :class:`WireError` naming the field, which the server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

import numpy as np

from paradiffpolicy.remote import policy_service_pb2 as pb

DTYPES = {"float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int64": np.int64}
MAX_RANK = 6


class WireError(ValueError):
    """A message field that cannot be what it claims (names the field)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def encode(array) -> pb.Tensor:
    """A numpy array or torch tensor as a ``Tensor`` message (little-endian, C order)."""
    a = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    name = a.dtype.name
    if name not in DTYPES:
        raise WireError("tensor", f"dtype {name} cannot travel; expected one of {list(DTYPES)}")
    data = np.ascontiguousarray(a, dtype=np.dtype(DTYPES[name]).newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=name, shape=list(a.shape), data=data)


def decode(msg: pb.Tensor, field: str, max_elements: int = 1 << 26) -> np.ndarray:
    """The array a ``Tensor`` message holds (native byte order, writable), or :class:`WireError`."""
    if msg.dtype not in DTYPES:
        raise WireError(field, f"dtype {msg.dtype!r} is not one of {list(DTYPES)}")
    shape = [int(d) for d in msg.shape]
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise WireError(field, f"shape {shape} must have at most {MAX_RANK} non-negative sizes")
    n = math.prod(shape)
    if n > max_elements:
        raise WireError(field, f"shape {shape} has {n} elements; at most {max_elements} are accepted")
    dtype = np.dtype(DTYPES[msg.dtype]).newbyteorder("<")
    if len(msg.data) != n * dtype.itemsize:
        raise WireError(field, f"{len(msg.data)} bytes of data for shape {shape} of {msg.dtype} "
                               f"(expected {n * dtype.itemsize})")
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape).astype(DTYPES[msg.dtype])
