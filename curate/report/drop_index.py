"""Which stage dropped a sample, looked up by key for whole columns of keys at once.

The drop log's sample rows are held as two numpy arrays (a 64-bit number per key, sorted, and the
dropping stage's code), so that tens of millions of drops fit in a few hundred MB and a batch of
keys is looked up with one binary search.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.drop_log import iter_drops, sample_mask

KEPT = -1  # the code of a key the drop log does not hold
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


def key_numbers(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per key: its value for a key of 16 hex digits (curate.schema.sample_key), else the first 8
    bytes of its blake2b digest."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    numbers = np.zeros(len(keys), dtype=np.uint64)
    if not len(keys):
        return numbers
    hexadecimal = pc.fill_null(pc.match_substring_regex(keys, "^[0-9a-f]{16}$"), False).to_numpy(
        zero_copy_only=False)
    if hexadecimal.any():
        fixed = keys.filter(pa.array(hexadecimal)).cast(pa.binary(16))
        data = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)[fixed.offset * 16:(fixed.offset + len(fixed)) * 16]
        nibbles = _HEX[data].reshape(-1, 16).astype(np.uint64)
        shifts = np.arange(60, -1, -4, dtype=np.uint64)
        numbers[hexadecimal] = np.bitwise_or.reduce(nibbles << shifts, axis=1)
    for index in np.flatnonzero(~hexadecimal):
        digest = hashlib.blake2b(str(keys[int(index)].as_py()).encode(), digest_size=8).digest()
        numbers[index] = int.from_bytes(digest, "big")
    return numbers


class DropIndex:
    """The whole-sample drops of a drop log: `stages` lists the dropping stages, `lookup` gives each key's
    code into it (KEPT when the key was not dropped)."""

    def __init__(self, numbers: np.ndarray, codes: np.ndarray, stages: list[str]):
        order = np.argsort(numbers, kind="stable")
        self.numbers = numbers[order]
        self.codes = codes[order]
        self.stages = stages

    @classmethod
    def read(cls, drops_file) -> "DropIndex":
        """The index of the drop log file `drops_file` (OUT/drops.parquet), read one record batch at a time."""
        stages: dict[str, int] = {}
        numbers, codes = [], []
        for table in iter_drops(drops_file, ["key", "stage", "image"]):
            table = table.filter(sample_mask(table))
            encoded = pc.dictionary_encode(pc.fill_null(table.column("stage"), "unknown")).combine_chunks()
            mapping = np.array([stages.setdefault(name, len(stages)) for name in encoded.dictionary.to_pylist()],
                               dtype=np.int16)
            numbers.append(key_numbers(table.column("key")))
            codes.append(mapping[encoded.indices.to_numpy(zero_copy_only=False)])
        empty = (np.zeros(0, np.uint64), np.zeros(0, np.int16))
        return cls(np.concatenate(numbers or [empty[0]]), np.concatenate(codes or [empty[1]]), list(stages))

    def lookup(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per key, the code of the stage that dropped it (int16), or KEPT."""
        numbers = key_numbers(keys)
        if not len(self.numbers):
            return np.full(len(numbers), KEPT, dtype=np.int16)
        at = np.minimum(np.searchsorted(self.numbers, numbers), len(self.numbers) - 1)
        return np.where(self.numbers[at] == numbers, self.codes[at], KEPT).astype(np.int16)
