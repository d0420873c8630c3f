"""Vectorised Arrow building blocks for the simulator: identifiers, list columns, text banks.

Everything here works on whole numpy arrays so the simulator never loops per exchange.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The two hex digits of every byte value.
_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint8).reshape(
    256, 2)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 finaliser of `values ^ salt`: a bijection on uint64, so distinct counters give
    distinct, random-looking identifiers without any collision check."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fixed_width_strings(matrix: np.ndarray) -> pa.StringArray:
    """An Arrow string array whose i-th value is the ASCII bytes of row i of `matrix`."""
    n, width = matrix.shape
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(width)
    data = np.ascontiguousarray(matrix, dtype=np.uint8)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def hex_ids(prefix: str, counters: np.ndarray, salt: int, digits: int = 16) -> pa.StringArray:
    """`prefix` + `digits` hex characters of mix64(counter): unique per counter and salt."""
    mixed = mix64(np.asarray(counters, dtype=np.uint64), salt)
    octets = mixed.astype(">u8").view(np.uint8).reshape(-1, 8)  # most significant first
    chars = _HEX_PAIRS[octets].reshape(-1, 16)[:, 16 - digits :]
    head = np.frombuffer(prefix.encode("ascii"), dtype=np.uint8)
    matrix = np.concatenate([np.broadcast_to(head, (len(mixed), len(head))), chars], axis=1)
    return fixed_width_strings(matrix)


def list_array(lengths: np.ndarray, values: pa.Array, valid: np.ndarray | None = None) -> pa.Array:
    """A list array with row i holding the next `lengths[i]` items of `values`; rows where
    `valid` is False are null."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = None if valid is None else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def positions_within(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of the given lengths laid end to end: (group index, position in group) of
    every item."""
    lengths = np.asarray(lengths, dtype=np.int64)
    group = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return group, np.arange(int(lengths.sum()), dtype=np.int64) - starts[group]


def dictionary_take(values: pa.Array, indices: np.ndarray, null: np.ndarray | None = None,
                    extra: pa.Array | None = None) -> pa.DictionaryArray:
    """Rows `values[indices]` as a dictionary array holding only the values used.

    A negative index -1-j picks `extra[j]` instead (text made for this chunk, e.g. wrapped
    prompts). Rows where `null` is True are null. Only the distinct values are copied, which
    is what makes gathering long repeated texts cheap, and Parquet then writes the dictionary
    once per row group instead of hashing every row.
    """
    indices = np.asarray(indices, dtype=np.int64)
    from_values = indices >= 0
    use = from_values if null is None else from_values & ~null
    used = np.zeros(len(values), dtype=bool)
    used[indices[use]] = True
    keep = np.flatnonzero(used)
    remap = np.cumsum(used, dtype=np.int64) - 1
    codes = np.where(from_values, remap[np.maximum(indices, 0)], len(keep) - 1 - indices)
    if null is not None:
        codes[null] = 0
    dictionary = values.take(pa.array(keep))
    if extra is not None:
        dictionary = pa.concat_arrays([dictionary, extra.cast(dictionary.type)])
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32), mask=null),
                                          dictionary)


def small_dictionary(codes: np.ndarray, values: pa.Array,
                     null: np.ndarray | None = None) -> pa.DictionaryArray:
    """Codes into a fixed pool as a dictionary array over the whole pool, copying no values:
    for small pools (roles, models, user agents...), or the text bank before `compact`."""
    codes = np.asarray(codes).astype(np.int32)
    if null is not None:
        codes = np.where(null, 0, codes).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=null), values)


def compact(array: pa.DictionaryArray) -> pa.DictionaryArray:
    """`array` with a dictionary of only the values its rows use (see `dictionary_take`)."""
    null = array.is_null().to_numpy(zero_copy_only=False) if array.null_count else None
    indices = pc.fill_null(array.indices, 0).to_numpy()
    return dictionary_take(array.dictionary, indices, null=null)


class TextBank:
    """Named pools of strings concatenated into one Arrow array, so a single `take` can gather
    text from any mix of pools. 32-bit offsets: the bank (and any chunk gathered from it) stays
    far below 2 GiB, and takes then produce the contract's `string` type without a cast."""

    def __init__(self) -> None:
        self._pools: list[pa.Array] = []
        self.offset: dict[str, int] = {}
        self.size: dict[str, int] = {}
        self._array: pa.Array | None = None
        self._distinct: tuple[np.ndarray, pa.Array] | None = None
        self._byte_lengths: np.ndarray | None = None

    def add(self, name: str, values: list[str] | pa.Array) -> None:
        if name in self.offset:
            raise ValueError(f"text pool {name!r} added twice")
        array = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        if len(array) == 0:
            raise ValueError(f"text pool {name!r} is empty")
        self.offset[name] = sum(len(p) for p in self._pools)
        self.size[name] = len(array)
        self._pools.append(array.cast(pa.string()))
        self._array = self._distinct = self._byte_lengths = None

    @property
    def array(self) -> pa.Array:
        if self._array is None:
            self._array = pa.concat_arrays(self._pools)
        return self._array

    @property
    def distinct(self) -> tuple[np.ndarray, pa.Array]:
        """(index into the distinct texts of every entry, the distinct texts): pools overlap
        (homework and math share prompts), and a Parquet dictionary must hold a text once."""
        if self._distinct is None:
            encoded = self.array.dictionary_encode()
            self._distinct = (encoded.indices.to_numpy(), encoded.dictionary)
        return self._distinct

    @property
    def byte_lengths(self) -> np.ndarray:
        """Byte length of every entry, for token estimates without touching the text."""
        if self._byte_lengths is None:
            offsets = np.frombuffer(self.array.buffers()[1], dtype=np.int32)
            offsets = offsets[self.array.offset : self.array.offset + len(self.array) + 1]
            self._byte_lengths = np.diff(offsets)
        return self._byte_lengths

    def index(self, name: str, local: np.ndarray) -> np.ndarray:
        """Bank-wide indices of entries `local % size` of pool `name`."""
        return self.offset[name] + (np.asarray(local, dtype=np.int64) % self.size[name])
