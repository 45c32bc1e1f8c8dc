"""A GGUF reader that parses metadata arrays in bulk: ``gguf.GGUFReader`` without its slow part.

``gguf.GGUFReader`` builds a numpy view per array element, two per string, so opening a file
with a 262k-token vocabulary spends ~10 s on ``tokenizer.ggml.tokens``, ``.scores`` and
``.token_type``. :func:`open_gguf` returns a subclass that reads such arrays in one pass:

* a numeric array is one numpy view of the memory map;
* an array of strings is one scan over its uint64 length prefixes, keeping only where each
  string starts; its strings are decoded when asked for (:func:`field_strings`).

Everything else is the package's own code: the header, scalars, strings, nested arrays (rare:
parsed element by element, as the package does) and ``reader.tensors``. Fields keep the
package's shape: ``parts``, ``data`` and ``types`` index as they do in ``gguf.ReaderField`` (the
element parts of a bulk array are made on demand) and ``contents()`` gives the same values.

Every read is checked against the file's size, and an array's count against the bytes left,
before anything is allocated: a truncated or corrupt file raises ``ValueError`` saying where.
"""

from __future__ import annotations

import math
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFValueType

__all__ = ["FastGGUFReader", "field_numbers", "field_strings", "open_gguf"]

_V = GGUFValueType
_ARRAY_HEAD_BYTES = 12  # uint32 item type + uint64 count
_STRING_HEAD_BYTES = 8  # uint64 length
_MIN_KV_BYTES = _STRING_HEAD_BYTES + 4 + 1  # key length, value type, the smallest value


class _ArrayParts(Sequence[npt.NDArray[Any]]):
    """The ``parts`` of a bulk-read array field, indexed as ``gguf.ReaderField.parts`` is.

    ``head`` holds the parts before the elements (key length, key, value type, item type,
    count); element parts are views made when indexed, so none exist until someone asks.
    """

    __slots__ = ("_head", "_n")

    def __init__(self, head: list[npt.NDArray[Any]], n: int) -> None:
        self._head = head
        self._n = n  # number of element parts

    def __len__(self) -> int:
        return len(self._head) + self._n

    @overload
    def __getitem__(self, index: int) -> npt.NDArray[Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[npt.NDArray[Any]]: ...
    def __getitem__(self, index: int | slice) -> npt.NDArray[Any] | list[npt.NDArray[Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # negative indices, and IndexError as a list gives it
        if i < len(self._head):
            return self._head[i]
        return self._element_part(i - len(self._head))

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        for i in range(len(self)):
            yield self[i]

    def _element_part(self, j: int) -> npt.NDArray[Any]:
        raise NotImplementedError

    def prefixed(self, prefix: list[npt.NDArray[Any]]) -> _ArrayParts:
        """The same parts with ``prefix`` put before the head (the key's parts)."""
        raise NotImplementedError


class _NumberParts(_ArrayParts):
    """An array of numbers or bools: ``values`` is one view; element ``j`` is ``values[j:j+1]``."""

    __slots__ = ("values",)

    def __init__(self, head: list[npt.NDArray[Any]], values: npt.NDArray[Any]) -> None:
        super().__init__(head, len(values))
        self.values = values

    def _element_part(self, j: int) -> npt.NDArray[Any]:
        return self.values[j : j + 1]

    def prefixed(self, prefix: list[npt.NDArray[Any]]) -> _NumberParts:
        return _NumberParts(prefix + self._head, self.values)


class _StringParts(_ArrayParts):
    """An array of strings: ``bounds[i]`` is where string ``i``'s bytes start, and
    ``bounds[i + 1] - 8`` where they end (``bounds`` has one entry more than there are strings).

    Element parts alternate as in gguf: the uint64 length, then the bytes.
    """

    __slots__ = ("_bounds", "_data", "_len_dtype")

    def __init__(
        self,
        head: list[npt.NDArray[Any]],
        data: npt.NDArray[np.uint8],
        bounds: array[int],
        len_dtype: np.dtype[Any],
    ) -> None:
        super().__init__(head, 2 * (len(bounds) - 1))
        self._data = data
        self._bounds = bounds
        self._len_dtype = len_dtype

    @property
    def n_strings(self) -> int:
        return len(self._bounds) - 1

    def _element_part(self, j: int) -> npt.NDArray[Any]:
        k, is_bytes = divmod(j, 2)
        start = self._bounds[k]
        if is_bytes:
            return self._data[start : self._bounds[k + 1] - _STRING_HEAD_BYTES]
        return self._data[start - _STRING_HEAD_BYTES : start].view(self._len_dtype)

    def prefixed(self, prefix: list[npt.NDArray[Any]]) -> _StringParts:
        return _StringParts(prefix + self._head, self._data, self._bounds, self._len_dtype)

    def strings(self, index: slice = slice(None), errors: str = "strict") -> list[str]:
        """Strings ``index`` of the array decoded from UTF-8 with ``errors`` (one copy of the
        array's bytes, then one decode per string)."""
        picked = range(self.n_strings)[index]
        if not picked:
            return []
        bounds = self._bounds
        if picked.step == 1:  # the whole array or a run of it: copy just that span
            base = bounds[picked.start]
            raw = self._data[base : bounds[picked.stop] - _STRING_HEAD_BYTES].tobytes()
            starts = np.frombuffer(bounds, np.int64)[picked.start : picked.stop + 1] - base
            begin = starts[:-1].tolist()
            end = (starts[1:] - _STRING_HEAD_BYTES).tolist()
            return [raw[b:e].decode("utf-8", errors) for b, e in zip(begin, end, strict=True)]
        return [self.string(k, errors) for k in picked]

    def string(self, index: int, errors: str = "strict") -> str:
        """String ``index`` (negative counts from the end) decoded from UTF-8 with ``errors``."""
        k = range(self.n_strings)[index]
        raw = self._data[self._bounds[k] : self._bounds[k + 1] - _STRING_HEAD_BYTES]
        return raw.tobytes().decode("utf-8", errors)


class _Field(gguf.ReaderField):
    """A ``gguf.ReaderField`` whose ``parts`` are bulk (``_ArrayParts``): ``contents()`` reads
    the bulk form directly instead of one part per element."""

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        parts = self.parts
        if isinstance(parts, _StringParts):
            if isinstance(index_or_slice, slice):
                return parts.strings(index_or_slice)
            return parts.string(index_or_slice)
        if isinstance(parts, _NumberParts):
            # .tolist() gives Python scalars, as gguf's per-part .tolist() does
            return parts.values[index_or_slice].tolist()
        return super().contents(index_or_slice)


class FastGGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with metadata arrays read in bulk and every read bounds-checked.

    Open one with :func:`open_gguf`. ``fields``, ``tensors``, ``data``, ``get_field`` and
    ``field.contents()`` behave as the package's; use :func:`field_strings` and
    :func:`field_numbers` to get a whole array at once.
    """

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        # gguf slices the map, which silently stops at the end of the file: check first, so a
        # truncated file or a corrupt length fails here, saying where, and nothing is read
        offset, count = int(offset), int(count)
        n_bytes = np.dtype(dtype).itemsize * count
        size = len(self.data)
        if offset < 0 or count < 0 or offset + n_bytes > size:
            raise ValueError(
                f"truncated or corrupt GGUF file: {count} x {np.dtype(dtype).name} at offset "
                f"{offset} runs past the end of the file ({size} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        offs, count = int(offs), int(count)
        left = len(self.data) - offs
        if count * _MIN_KV_BYTES > left:
            raise ValueError(
                f"truncated or corrupt GGUF file: {count} metadata keys cannot fit in the "
                f"{left} bytes left"
            )
        for _ in range(count):
            orig_offs = offs
            key_len, key = self._get_str(offs)
            offs += int(key_len.nbytes + key.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            head: list[npt.NDArray[Any]] = [key_len, key, raw_type]
            size, parts, idxs, types = self._get_field_parts(offs, int(raw_type[0]))
            name = str(bytes(key), encoding="utf-8")
            if isinstance(parts, _ArrayParts):
                assert isinstance(idxs, range)
                shift = len(head)
                field: gguf.ReaderField = _Field(
                    orig_offs,
                    name,
                    parts.prefixed(head),  # type: ignore[arg-type]  # a Sequence, not a list
                    range(idxs.start + shift, idxs.stop + shift, idxs.step),  # type: ignore[arg-type]
                    types,
                )
            else:
                field = gguf.ReaderField(
                    orig_offs, name, head + list(parts), [i + len(head) for i in idxs], types
                )
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _get_field_parts(  # type: ignore[override]  # parts/idxs may be lazy sequences
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, Sequence[npt.NDArray[Any]], Sequence[int], list[GGUFValueType]]:
        gtype = GGUFValueType(int(raw_type))
        if gtype != _V.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        n = int(count[0])
        offs = orig_offs + _ARRAY_HEAD_BYTES
        head: list[npt.NDArray[Any]] = [raw_itype, count]
        if n == 0:  # gguf: no element, so no item type in `types` (nor is it checked)
            return _ARRAY_HEAD_BYTES, head, [], [gtype]
        itype = GGUFValueType(int(raw_itype[0]))
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            min_item = np.dtype(nptype).itemsize
        else:
            min_item = _STRING_HEAD_BYTES if itype == _V.STRING else _ARRAY_HEAD_BYTES
        left = len(self.data) - offs
        if n * min_item > left:  # before anything is sized by n
            raise ValueError(
                f"truncated or corrupt GGUF file: an array of {n} {itype.name} at offset "
                f"{orig_offs} cannot fit in the {left} bytes left"
            )
        if nptype is not None:
            values = self._get(offs, nptype, n)
            parts: _ArrayParts = _NumberParts(head, values)
            return _ARRAY_HEAD_BYTES + int(values.nbytes), parts, range(2, 2 + n), [gtype, itype]
        if itype == _V.STRING:
            bounds = self._scan_strings(offs, n)
            len_dtype = np.dtype(np.uint64).newbyteorder(self.byte_order)
            parts = _StringParts(head, self.data, bounds, len_dtype)
            size = bounds[-1] - _STRING_HEAD_BYTES - orig_offs
            return size, parts, range(3, 3 + 2 * n, 2), [gtype, itype]
        # an array of arrays: element by element as gguf does (this method reads each one)
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        # gguf sizes a tensor in uint64 arithmetic, which a corrupt shape or offset can wrap
        # around to a small, readable range: size each one exactly first
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
            except (ValueError, KeyError):
                continue  # an unknown type: gguf's own code says so
            n_bytes = math.prod(int(d) for d in dims) * type_size // block
            begin = int(start_offs) + int(offset[0])
            if begin + n_bytes > size:
                shown = bytes(name).decode("utf-8", "replace")
                raise ValueError(
                    f"truncated or corrupt GGUF file: tensor {shown!r} ({n_bytes} bytes at offset "
                    f"{begin}) runs past the end of the file ({size} bytes)"
                )
        super()._build_tensors(start_offs, fields)

    def _scan_strings(self, offs: int, n: int) -> array[int]:
        """Where each of ``n`` length-prefixed strings from ``offs`` starts, plus the end of the
        last one + 8: one pass over the prefixes, each checked against the end of the file."""
        order = "<" if self.endianess == GGUFEndian.LITTLE else ">"
        unpack = struct.Struct(f"{order}Q").unpack_from
        buf = memoryview(self.data)
        size = len(buf)
        bounds = array("q")  # grows as strings are found: a corrupt count allocates nothing
        push = bounds.append
        for _ in range(n):
            if offs + _STRING_HEAD_BYTES > size:
                raise ValueError(
                    f"truncated or corrupt GGUF file: the length of a string at offset {offs} "
                    f"runs past the end of the file ({size} bytes)"
                )
            (length,) = unpack(buf, offs)
            offs += _STRING_HEAD_BYTES
            push(offs)
            if length > size - offs:
                raise ValueError(
                    f"truncated or corrupt GGUF file: a string of {length} bytes at offset "
                    f"{offs} runs past the end of the file ({size} bytes)"
                )
            offs += length
        push(offs + _STRING_HEAD_BYTES)
        return bounds


def open_gguf(path: str | os.PathLike[str]) -> FastGGUFReader:
    """Open a GGUF file read-only (memory-mapped), its metadata arrays read in bulk.

    Raises:
        OSError: the file cannot be opened or mapped.
        ValueError: it is not GGUF, or is truncated or corrupt (the message says where).
    """
    return FastGGUFReader(path, "r")


def field_strings(field: gguf.ReaderField, errors: str = "strict") -> list[str]:
    """Every string of an array-of-strings field, decoded from UTF-8 with ``errors`` (a new
    list). Works on fields of ``gguf.GGUFReader`` too, part by part."""
    if isinstance(field.parts, _StringParts):
        return field.parts.strings(errors=errors)
    parts = field.parts
    return [bytes(parts[i]).decode("utf-8", errors) for i in field.data]


def field_numbers(field: gguf.ReaderField) -> npt.NDArray[Any]:
    """Every value of a numeric array field as one native-order numpy array (a copy, not a
    view of the file). Works on fields of ``gguf.GGUFReader`` too, part by part."""
    if isinstance(field.parts, _NumberParts):
        values = field.parts.values
        return np.array(values, dtype=values.dtype.newbyteorder("="))
    if not field.data:
        return np.zeros(0)
    values = np.concatenate([field.parts[i] for i in field.data])
    return values.astype(values.dtype.newbyteorder("="), copy=False)
