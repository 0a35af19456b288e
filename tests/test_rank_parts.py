"""Per-rank output parts merged by name into a streamed .npz (``vistok.common.rank_parts``), and
2-process sampling through them: same bytes as ``np.savez``, global index order, bounded reads,
no part left behind."""

from __future__ import annotations

import json
import os
import socket
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ar_cli import image_shards, save_generator, save_tokenizer

from vistok.common.processes import process_setup, process_teardown
from vistok.common.rank_parts import PartSet, PartWriter, part_paths, write_npz_stream
from vistok.generators import inference
from vistok.generators.inference import sample
from vistok.generators.posttrain_pairs import make_pairs
from vistok.generators.posttrain_pairs import parse_args as parse_pairs_args
from vistok.generators.sample_cli import parse_args


def images(n: int, seed: int = 0, hw: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)


@pytest.mark.parametrize("n, chunk", [(10, 4), (12, 4), (3, 8), (0, 2)])
def test_streamed_npz_has_the_bytes_of_np_savez(tmp_path, n, chunk):
    arr, labels = images(n, seed=n), np.arange(n, dtype=np.int64) % 3
    np.savez(tmp_path / "ref.npz", arr_0=arr, labels=labels)
    pieces = (arr[i : i + chunk] for i in range(0, n, chunk))
    write_npz_stream(tmp_path / "new.npz", arr.shape, arr.dtype, pieces, labels=labels)
    loaded = np.load(tmp_path / "new.npz")
    assert loaded["arr_0"].dtype == np.uint8 and np.array_equal(loaded["arr_0"], arr)
    assert np.array_equal(loaded["labels"], labels)
    with zipfile.ZipFile(tmp_path / "ref.npz") as ref, zipfile.ZipFile(tmp_path / "new.npz") as new:
        assert ref.namelist() == new.namelist()
        for name in ref.namelist():
            assert ref.read(name) == new.read(name), name


def test_streamed_npz_refuses_a_wrong_row_count(tmp_path):
    arr = images(5)
    with pytest.raises(ValueError, match="got 4 rows, its header says 5"):
        write_npz_stream(tmp_path / "x.npz", arr.shape, arr.dtype, iter([arr[:4]]))


def write_parts(folder, n: int, batch: int, world: int, hw: int = 5) -> np.ndarray:
    """Batches dealt round-robin to ``world`` ranks, as sampling does; returns all rows."""
    arr = images(n, seed=1, hw=hw)
    jobs = list(range(0, n, batch))
    for rank in range(world):
        mine = jobs[rank::world]
        writer = PartWriter(folder, rank, sum(min(batch, n - s) for s in mine))
        for s in mine:
            idx = np.arange(s, min(s + batch, n))
            writer.append(idx, arr[idx])
        writer.close()
    return arr


@pytest.mark.parametrize("n, batch, world, chunk", [(11, 2, 3, 3), (9, 4, 2, 4), (3, 4, 2, 2)])
def test_parts_read_back_in_global_order_a_chunk_at_a_time(tmp_path, n, batch, world, chunk):
    arr = write_parts(tmp_path / "parts", n, batch, world)
    parts = PartSet(tmp_path / "parts", world)
    assert parts.shape == arr.shape and parts.dtype == np.uint8
    got = list(parts.chunks(chunk))
    assert all(len(c) <= chunk for c in got)
    assert np.array_equal(np.concatenate(got), arr)
    assert np.array_equal(parts.read(1, n - 1), arr[1 : n - 1])
    parts.remove()
    assert not (tmp_path / "parts").exists()


def test_merging_holds_a_chunk_not_the_array(tmp_path):
    n, batch = 120, 4
    arr = write_parts(tmp_path / "parts", n, batch, world=2, hw=32)  # 120 x 3 KiB rows
    del arr
    parts = PartSet(tmp_path / "parts", 2)
    tracemalloc.start()
    write_npz_stream(tmp_path / "s.npz", parts.shape, parts.dtype, parts.chunks(batch))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row = int(np.prod(parts.shape[1:]))
    assert peak < 20 * row < n * row  # a few chunks (plus zip buffers), not 120 rows
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], images(n, seed=1, hw=32))


def test_parts_that_do_not_cover_every_index_are_refused(tmp_path):
    write_parts(tmp_path / "parts", 8, 2, world=2)
    _, index_path = part_paths(tmp_path / "parts", 1)
    np.save(index_path, np.array([2, 3, 6, 6]))
    with pytest.raises(ValueError, match="do not cover 0..7 once"):
        PartSet(tmp_path / "parts", 2)
    with pytest.raises(ValueError, match="wrote 2 rows, its share is 3"):
        writer = PartWriter(tmp_path / "other", 0, 3)
        writer.append(np.arange(2), images(2))
        writer.close()


def _sample_worker(rank: int, world: int, ports: tuple, jobs: list, log: str) -> None:
    """Runs the library calls ``jobs`` in turn in one process group, as a script or a notebook
    would, then ends the group and starts a new one; logs rank 0's merge reads and whether the
    group was up after each step."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0])}
    )
    torch.set_num_threads(1)
    reads, group_up = [], []
    read = inference.PartSet.read

    def logged(self, start, stop):
        reads.append(stop - start)
        return read(self, start, stop)

    inference.PartSet.read = logged  # this spawned process only
    calls = {
        "sample": lambda argv: sample(parse_args(argv)),
        "pairs": lambda argv: make_pairs(parse_pairs_args(argv)),
    }
    for kind, argv in jobs:
        calls[kind](argv)
        group_up.append(dist.is_initialized())
    process_teardown()  # as the commands end; a new group can start after it
    group_up.append(dist.is_initialized())
    os.environ["MASTER_PORT"] = str(ports[1])
    again = process_setup()
    group_up.append(dist.is_initialized() and again[:2] == (rank, world))
    process_teardown()
    with open(f"{log}{rank}.json", "w") as f:
        json.dump({"reads": reads, "group_up": group_up}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sampling_merges_parts_by_name(tmp_path, one_thread):
    """Two processes sample, make post-training pairs and sample again in one process group:
    the library calls leave the group up, and each sampling run writes what one process does."""
    save_tokenizer(tmp_path / "tok.ckpt")
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=False)
    argv = ["--generator", gen, "--num-images", "7", "--batch-size", "2", "--fid", "off"]
    sample(parse_args([*argv, "--out", str(tmp_path / "one")]))
    shards = image_shards(tmp_path, 6)  # 2 shards: one per process
    outs = [tmp_path / "two", tmp_path / "again"]
    jobs = [
        ("sample", [*argv, "--out", str(outs[0])]),
        ("pairs", ["--generator", gen, "--shards", shards, "--out", str(tmp_path / "pairs")]),
        ("sample", [*argv, "--out", str(outs[1])]),
    ]
    mp.spawn(
        _sample_worker,
        args=(2, (free_port(), free_port()), jobs, str(tmp_path / "log")),
        nprocs=2,
        join=True,
    )
    one_npz = np.load(tmp_path / "one" / "samples.npz")
    for two in outs:
        two_npz = np.load(two / "samples.npz")
        assert two_npz["arr_0"].shape[0] == 7
        assert np.array_equal(two_npz["arr_0"], one_npz["arr_0"])
        assert np.array_equal(two_npz["labels"], one_npz["labels"])
        assert not (two / "parts").exists() and (two / "grid.png").is_file()
    assert not (tmp_path / "one" / "parts").exists()
    pairs = json.loads((tmp_path / "pairs" / "meta.json").read_text())["splits"]["train"]
    assert pairs["complete"] and pairs["count"] == 6
    logs = [json.loads((tmp_path / f"log{r}.json").read_text()) for r in range(2)]
    assert [log["group_up"] for log in logs] == [[True, True, True, False, True]] * 2
    assert logs[0]["reads"] and max(logs[0]["reads"]) <= 2  # rank 0 merged a batch at a time
    assert logs[1]["reads"] == []


def test_write_images_streams_the_npz_and_grids_the_first_64(tmp_path, monkeypatch):
    arr = write_parts(tmp_path / "parts", 70, 4, world=3)
    grids = []
    monkeypatch.setattr(inference, "save_grid", lambda rows, path: grids.append(rows))
    labels = torch.arange(70) % 5
    inference.write_images(tmp_path, PartSet(tmp_path / "parts", 3), labels, chunk=4)
    npz = np.load(tmp_path / "samples.npz")
    assert np.array_equal(npz["arr_0"], arr) and np.array_equal(npz["labels"], labels.numpy())
    grid = torch.cat(grids[0])  # (64, 3, H, W) in [-1, 1]
    expected = torch.from_numpy(arr[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert len(grids[0]) == 8 and torch.equal(grid, expected)
    assert not (tmp_path / "parts").exists()
