"""Pickling with out-of-band buffers, so large arrays and tensors travel as frames of their own.

``dumps`` returns ``[pickle, *buffers]``; the buffers are views of the objects' memory (zero-copy
when sent with ``copy=False``). CPU tensors are reduced through their storage: the storage's bytes
become one out-of-band buffer and pickle's memo keeps views of one storage sharing it (tied
weights stay tied). Everything else is cloudpickle protocol 5.

Code pickled by value (functions of ``__main__``, of a notebook cell, closures) keeps its file
name, which cloudpickle would replace by ``<dynamic-code>``, so that tracebacks and stack dumps
in workers point at the user's file and line. Where that file exists only in this process's
``linecache`` (a notebook cell), its lines travel with the code and are put into the worker's.
"""

from __future__ import annotations

__all__ = ["dumps", "loads"]

import ctypes
import io
import linecache
import os
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

Buffer = bytes | memoryview | pickle.PickleBuffer


def _storage_view(storage: torch.UntypedStorage) -> memoryview:
    """Writable view of a CPU storage's bytes that keeps the storage alive."""
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_char * nbytes).from_address(storage.data_ptr())
    array._storage = storage  # type: ignore[attr-defined]  # noqa: SLF001 -- keep-alive
    return memoryview(array).cast("B")


def _rebuild_storage(buffer: memoryview | bytes | bytearray) -> torch.UntypedStorage:
    import torch  # noqa: PLC0415 -- only processes that receive tensors import torch

    if len(buffer) == 0:
        return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]  # unannotated in torch
    if isinstance(buffer, bytes) or memoryview(buffer).readonly:
        # in-band (small) buffers arrive as immutable bytes; torch needs writable memory
        buffer = bytearray(buffer)
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()


def _rebuild_tensor(  # noqa: PLR0913, PLR0917 -- positional, like torch's _rebuild_tensor_v2
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
) -> torch.Tensor:
    import torch  # noqa: PLC0415

    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
    return tensor.requires_grad_(requires_grad)


def _plain_cpu_tensor(obj: Any, torch: Any) -> bool:
    return (
        type(obj) is torch.Tensor
        and obj.device.type == "cpu"
        and obj.layout is torch.strided
        and not obj.is_quantized
        and not obj.is_conj()
        and not obj.is_neg()
        and (obj.is_leaf or not obj.requires_grad)
        and not obj.__dict__
        and not any(getattr(obj, "names", None) or ())
    )


def _rebuild_code(
    reduced: tuple[Any, tuple[Any, ...]], filename: str, lines: list[str] | None
) -> types.CodeType:
    rebuild, args = reduced
    code: types.CodeType = rebuild(*args)
    if lines is not None and filename not in linecache.cache:
        # no mtime: linecache.checkcache keeps it although no such file exists here
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code.replace(co_filename=filename)


def _code_reduce(code: types.CodeType) -> Any:
    """Reduce ``code`` as cloudpickle does, keeping its file name (and lines, if only here)."""
    filename = code.co_filename
    lines = None
    if not os.path.exists(filename):  # noqa: PTH110 -- a name from a code object, not a Path
        lines = linecache.getlines(filename) or None
    return _rebuild_code, (cloudpickle.cloudpickle._code_reduce(code), filename, lines)  # noqa: SLF001


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return _code_reduce(obj)
        torch = sys.modules.get("torch")
        if torch is not None:
            if type(obj) is torch.UntypedStorage and obj.device.type == "cpu":
                return _rebuild_storage, (pickle.PickleBuffer(_storage_view(obj)),)
            if _plain_cpu_tensor(obj, torch):
                return _rebuild_tensor, (
                    obj.untyped_storage(),
                    obj.dtype,
                    obj.storage_offset(),
                    tuple(obj.size()),
                    obj.stride(),
                    obj.requires_grad,
                )
        return super().reducer_override(obj)


def dumps(obj: object) -> list[Buffer]:
    """Pickle ``obj`` into ``[pickle, *out_of_band_buffers]``."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    return [stream.getbuffer(), *(b.raw() for b in buffers)]


def loads(frames: Sequence[Buffer]) -> Any:
    """Inverse of ``dumps()``; ``frames[1:]`` become the out-of-band buffers."""
    return pickle.loads(frames[0], buffers=frames[1:])  # noqa: S301 -- authenticated peers only
