"""Per-rank outputs merged by name, in bounded memory.

Every rank appends its rows (e.g. uint8 images (n, H, W, 3)) batch by batch to its own
``rank{r}.npy`` with the global index of each row in ``rank{r}_index.npy`` (:class:`PartWriter`).
One process then reads the parts back in global index order, ``chunk`` rows at a time
(:class:`PartSet`), and :func:`write_npz_stream` streams them into an ``.npz`` member without
ever holding the whole array: no rank's memory grows with the number of rows, and nothing but
file names travels between processes. Files are read with plain seeks, not memory maps, so
pages already written do not stay resident in the reader.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def part_paths(folder: Path, rank: int) -> tuple[Path, Path]:
    """(rows, global indices) of ``rank``'s part in ``folder``."""
    return folder / f"rank{rank}.npy", folder / f"rank{rank}_index.npy"


def write_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The .npy header of a C-ordered array, the version ``np.save`` would choose."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    d["shape"] = tuple(shape)
    try:
        np.lib.format.write_array_header_1_0(f, d)
    except ValueError:  # header longer than 65535 bytes
        np.lib.format.write_array_header_2_0(f, d)


class PartWriter:
    """Appends one rank's rows to ``rank{r}.npy``; ``count`` is this rank's total row count
    (known in advance, so the header is written with the first batch, whose shape fixes the
    row shape and dtype). Only the row indices (8 bytes a row) are kept until :meth:`close`."""

    def __init__(self, folder: str | Path, rank: int, count: int) -> None:
        self.folder, self.rank, self.count = Path(folder), rank, count
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_path, self.index_path = part_paths(self.folder, rank)
        self.file = None
        self.row_shape: tuple[int, ...] | None = None
        self.indices: list[np.ndarray] = []

    def append(self, indices: np.ndarray, rows: np.ndarray) -> None:
        """Rows (n, ...) with their global indices (n,)."""
        rows = np.ascontiguousarray(rows)
        if len(indices) != len(rows):
            raise ValueError(f"{len(indices)} indices for {len(rows)} rows")
        if self.file is None:
            self.row_shape, self.dtype = rows.shape[1:], rows.dtype
            self.file = open(self.rows_path, "wb")  # noqa: SIM115  (closed in close())
            write_header(self.file, (self.count, *self.row_shape), self.dtype)
        elif rows.shape[1:] != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(
                f"rows {rows.shape[1:]} {rows.dtype} after {self.row_shape} {self.dtype}"
            )
        self.file.write(rows.tobytes())
        self.indices.append(np.asarray(indices, dtype=np.int64))

    def close(self) -> None:
        """Checks the row count and writes the index file."""
        written = sum(len(i) for i in self.indices)
        if written != self.count:
            raise ValueError(f"rank {self.rank} wrote {written} rows, its share is {self.count}")
        if self.file is not None:
            self.file.close()
        index = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        np.save(self.index_path, index)


class PartSet:
    """The parts of ranks 0..world-1 in ``folder``, read in global index order. The indices
    must cover 0..N-1 exactly once; all parts must have the same row shape and dtype."""

    def __init__(self, folder: str | Path, world: int) -> None:
        self.folder = Path(folder)
        self.parts: list[tuple[Path, int, tuple[int, ...], np.dtype] | None] = []
        indices, owners, rows_of = [], [], []
        for rank in range(world):
            rows_path, index_path = part_paths(self.folder, rank)
            index = np.load(index_path)
            indices.append(index)
            owners.append(np.full(len(index), rank, np.int64))
            rows_of.append(np.arange(len(index)))
            self.parts.append(self._header(rows_path, len(index)) if len(index) else None)
        index = np.concatenate(indices)
        self.count = len(index)
        if not np.array_equal(np.sort(index), np.arange(self.count)):
            raise ValueError(f"the parts in {self.folder} do not cover 0..{self.count - 1} once")
        order = np.argsort(index)
        self.owner = np.concatenate(owners)[order]  # (N,) rank holding global row i
        self.row = np.concatenate(rows_of)[order]  # (N,) its position in that rank's file
        shapes = {(p[2], p[3]) for p in self.parts if p is not None}
        if len(shapes) > 1:
            raise ValueError(f"the parts in {self.folder} disagree on row shape/dtype: {shapes}")
        self.row_shape, self.dtype = shapes.pop() if shapes else ((), np.dtype(np.uint8))

    @staticmethod
    def _header(path: Path, count: int) -> tuple[Path, int, tuple[int, ...], np.dtype]:
        """(path, data offset, row shape, dtype) of a part file."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            if fortran or shape[0] != count:
                raise ValueError(f"{path}: {shape[0]} rows, its index lists {count}")
            return path, f.tell(), tuple(shape[1:]), dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.row_shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Global rows [start, stop): contiguous runs of one rank's file are read at once."""
        out = np.empty((stop - start, *self.row_shape), self.dtype)
        row_bytes = out[0:1].nbytes if len(out) else 0
        i = start
        while i < stop:
            rank, first = int(self.owner[i]), int(self.row[i])
            j = i + 1
            while j < stop and self.owner[j] == rank and self.row[j] == first + (j - i):
                j += 1
            path, offset = self.parts[rank][:2]
            with open(path, "rb") as f:
                f.seek(offset + first * row_bytes)
                f.readinto(memoryview(out[i - start : j - start]).cast("B"))
            i = j
        return out

    def chunks(self, chunk: int) -> Iterator[np.ndarray]:
        """All rows in global order, at most ``chunk`` at a time."""
        for start in range(0, self.count, chunk):
            yield self.read(start, min(start + chunk, self.count))

    def remove(self) -> None:
        """Deletes the part files (and the folder when it is left empty)."""
        for rank in range(len(self.parts)):
            for path in part_paths(self.folder, rank):
                path.unlink(missing_ok=True)
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def write_npz_stream(
    path: str | Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: Iterable[np.ndarray],
    **small: np.ndarray,
) -> None:
    """An ``.npz`` like ``np.savez(path, arr_0=<chunks concatenated>, **small)`` (same member
    bytes, uncompressed), with ``arr_0`` of ``shape``/``dtype`` written chunk by chunk."""
    written = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            write_header(f, shape, dtype)
            for rows in chunks:
                if rows.shape[1:] != tuple(shape[1:]) or rows.dtype != dtype:
                    raise ValueError(f"chunk {rows.shape} {rows.dtype} for arr_0 {shape} {dtype}")
                f.write(np.ascontiguousarray(rows).tobytes())
                written += len(rows)
        if written != shape[0]:
            raise ValueError(f"arr_0 got {written} rows, its header says {shape[0]}")
        for name, array in small.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
