"""The wire format of the device protocol (docs/PROTOCOL.md): a JSON header frame, then raw tensors.

A message is a ZeroMQ multipart message ``[header, tensor_0, tensor_1, ...]``. The header is a
UTF-8 JSON object; its ``"tensors"`` entry lists ``{"name", "dtype", "shape"}`` for each following
frame, whose bytes are the tensor's elements in C order, in the machine's byte order (little-endian on
every platform astraora runs on). Nothing is ever unpickled:
decoding a message only parses JSON and copies bytes into tensors of whitelisted dtypes.
"""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 64 * 1024
MAX_DIMS = 8
MAX_DEPTH = 8  # nesting of a header: a request needs 3 (header, tensors list, spec)
MAX_INT_DIGITS = 20  # integers beyond 64 bits are never needed
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "uint8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text goes back to the sender."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode(header: dict, tensors: dict[str, Tensor] | None = None) -> list[bytes | memoryview]:
    """Frames for ``header`` (a JSON-able dict) and named tensors (sent as CPU, C-order bytes)."""
    tensors = tensors or {}
    arrays = [t.detach().to("cpu").contiguous() for t in tensors.values()]
    for t in arrays:
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype {t.dtype} cannot be sent; allowed: {list(DTYPES)}")
    specs = [
        {"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
        for name, t in zip(tensors, arrays, strict=True)
    ]
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    return [head, *(memoryview(t.numpy()).cast("B") for t in arrays)]


def encoded_size(frames: list) -> int:
    return sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)


def decode(frames: list[bytes], max_bytes: int) -> tuple[dict, dict[str, Tensor]]:
    """Header and tensors of a message; :class:`ProtocolError` for anything malformed or too big."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes exceeds the limit of {max_bytes} bytes")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES} bytes")
    header = parse_header(frames[0])
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError("malformed", "the header's 'tensors' list does not match the frames that follow")
    tensors = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        name, tensor = _tensor(spec, frame)
        if name in tensors:
            raise ProtocolError("malformed", f"tensor {name!r} appears twice")
        tensors[name] = tensor
    return header, tensors


def parse_header(frame) -> dict:
    """A header frame as a JSON object of bounded depth, whose integers fit 64 bits, whose numbers
    are finite and whose strings are valid Unicode (no lone surrogates); else ``malformed``."""
    try:
        header = json.loads(bytes(frame).decode("utf-8"), parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError("malformed", "the header frame is not UTF-8 JSON of bounded depth") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "the header is not a JSON object")
    stack = [(header, 1)]
    while stack:  # iterative: a hostile header cannot exhaust the stack here
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError("malformed", f"the header is nested deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str) and not _valid_text(text):
                    raise ProtocolError("malformed", "the header holds a string that is not valid Unicode")
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return header


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError("malformed", f"the header holds an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 64:
        raise ProtocolError("malformed", "the header holds a number written with more than 64 characters")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("malformed", "the header holds a number that is not finite")
    return value


def _constant(text: str):
    raise ProtocolError("malformed", f"the header holds {text}, which is not JSON")


def short(value, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error reply or a log line may echo."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _tensor(spec, frame: bytes) -> tuple[str, Tensor]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise ProtocolError("malformed", "a tensor spec must be {name, dtype, shape}")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 32:
        raise ProtocolError("malformed", "a tensor name must be a string of 1-32 characters")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError("malformed", f"tensor {name!r}: dtype {short(dtype)} is not one of {list(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError("malformed", f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} sizes >= 0")
    if not all(d < 2**62 for d in shape):
        raise ProtocolError("malformed", f"tensor {name!r}: a size over 2**62")
    torch_dtype = DTYPES[dtype]
    expected = math.prod(shape) * torch_dtype.itemsize
    if expected != len(frame):
        raise ProtocolError(
            "malformed", f"tensor {name!r}: {len(frame)} bytes for shape {shape} of {dtype} ({expected} expected)"
        )
    if expected == 0:
        return name, torch.empty(shape, dtype=torch_dtype)
    return name, torch.frombuffer(bytearray(frame), dtype=torch_dtype).reshape(shape)
