"""Code extraction under 2 processes (gloo, the environment torchrun sets): each rank writes its
own shards, rank 0 merges only names, counts and latent sums, and the folder holds exactly the
codes a 1-process run writes."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_ar_cli import TINY_VQ, image_shards
from test_rank_parts import free_port

from vistok.data.codes import CodeDataModule, LatentStats
from vistok.data.image_decode import SHARD_REASON
from vistok.tokenizers import extract_codes
from vistok.tokenizers.extract_codes import RankShare, extract, merge_shares
from vistok.tokenizers.gaussian import KLTokenizer
from vistok.tokenizers.vq import VQTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CNN = {k: v for k, v in TINY_VQ.items() if k != "codebook_size"}


def save(tok, path) -> str:
    state = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    torch.save({"hyper_parameters": {"tokenizer": tok.config}, "state_dict": state}, path)
    return str(path)


def shard_codes(folder: Path, names: list[str]) -> dict[str, bytes]:
    """{key: codes.npy bytes} of the named shards; a key met twice fails."""
    codes = {}
    for name in names:
        with tarfile.open(folder / name) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if suffix == "codes.npy":
                    assert key not in codes, f"{key} written twice"
                    codes[key] = tar.extractfile(member).read()
    return codes


def _extract_worker(rank: int, world: int, port: int, jobs: list[dict], log: str) -> None:
    """Runs every job in turn in one process group (as one script extracting two folders under
    torchrun would); logs the shards this process wrote and what each call returned."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    written = []
    write = extract_codes.write_shards

    def logged(*args, **kwargs):
        paths = write(*args, **kwargs)
        written[-1].extend(Path(p).name for p in paths)
        return paths

    extract_codes.write_shards = logged  # this spawned process only
    metas = []
    for job in jobs:
        written.append([])
        metas.append(extract(**job))
    torch.distributed.destroy_process_group()
    Path(f"{log}{rank}.json").write_text(json.dumps({"written": written, "meta": metas}))


def check_same_codes(one: dict[str, bytes], two: dict[str, bytes], continuous: bool) -> None:
    """Discrete codes byte for byte; float latents to rounding (a batch's composition changes
    the order the conv kernels sum in, and each rank batches other images together)."""
    assert sorted(two) == sorted(one)
    if not continuous:
        assert two == one
        return
    for key, data in one.items():
        a, b = np.load(io.BytesIO(data)), np.load(io.BytesIO(two[key]))
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)


def test_two_process_extraction_writes_the_codes_of_one(tmp_path):
    """VQ codes of 12 images in 3 shards (ranks split by shard), with mirrors; KL latents of 5
    images in 1 shard (ranks split by sample). A 1-process extraction of the same split is in
    the 2-process folder beforehand: its shards are replaced, another split's are kept."""
    torch.manual_seed(0)
    nets = {"vq": VQTokenizer(**TINY_VQ), "kl": KLTokenizer(latent_channels=4, **TINY_CNN)}
    images = {"vq": 12, "kl": 5}
    jobs, ones = [], {}
    for family, net in nets.items():
        spec = image_shards(tmp_path / family, images[family])  # 5 images per shard
        job = dict(
            tokenizer_path=save(net, tmp_path / f"{family}.ckpt"),
            shards=spec,
            flip=family == "vq",
            batch_size=4,
            num_workers=0,
        )
        ones[family] = extract(out=str(tmp_path / family / "one"), **job)["splits"]["train"]
        two_dir = tmp_path / family / "two"
        shutil.copytree(tmp_path / family / "one", two_dir)
        shutil.copy(two_dir / ones[family]["shards"][0], two_dir / "train-extra-000000.tar")
        jobs.append({**job, "out": str(two_dir)})
    log = str(tmp_path / "rank")
    mp.spawn(_extract_worker, args=(2, free_port(), jobs, log), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{log}{r}.json").read_text()) for r in range(2)]

    for j, family in enumerate(nets):
        one, two_dir = ones[family], tmp_path / family / "two"
        meta = json.loads((two_dir / "meta.json").read_text())
        assert ranks[0]["meta"][j] == meta and ranks[1]["meta"][j] is None
        two = meta["splits"]["train"]
        # Each rank wrote its own shards under its own names; meta.json lists exactly those.
        written = [rank["written"][j] for rank in ranks]
        for r in range(2):
            assert written[r] and all(n.startswith(f"train-r{r:03d}-") for n in written[r])
        assert two["shards"] == written[0] + written[1]
        on_disk = sorted(p.name for p in two_dir.glob("*.tar"))
        assert on_disk == sorted([*two["shards"], "train-extra-000000.tar"])

        for field in ("count", "views", "num_classes", "skipped", "source"):
            assert two[field] == one[field], (family, field)
        assert two["count"] == images[family]
        if family == "kl":
            for field in ("mean", "std"):
                np.testing.assert_allclose(
                    two["latent_stats"][field], one["latent_stats"][field], rtol=1e-6
                )
            assert two["latent_stats"]["count"] == one["latent_stats"]["count"]
        else:
            assert "latent_stats" not in two

        expected = shard_codes(tmp_path / family / "one", one["shards"])
        check_same_codes(expected, shard_codes(two_dir, two["shards"]), family == "kl")

        # The code DataModule reads the 2-process folder: every sample once.
        data = CodeDataModule(str(two_dir), val_split="train", batch_size=3, num_workers=0)
        seen = []
        for batch in data.val_dataloader(rank=0, world_size=1):
            for key, codes in zip(batch["key"], batch["codes"]):
                seen.append(key)
                view = torch.from_numpy(np.load(io.BytesIO(expected[key]))[0])
                torch.testing.assert_close(codes, view.to(codes.dtype), rtol=1e-5, atol=1e-6)
        assert sorted(seen) == sorted(expected)


def test_shares_merge_into_the_whole_splits_numbers():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(7, 3, 4, 4)) * [[[2.0]], [[0.5]], [[1.0]]]  # (N, C, H, W)
    whole, shares = LatentStats(), []
    whole.update(latents)
    # Rank 2 got no image: no shard, no label, no sums.
    for r, (rows, top) in enumerate([(latents[:4], 2), (latents[4:], 1), (latents[:0], -1)]):
        stats = LatentStats()
        if len(rows):
            stats.update(rows)
        names = [f"train-r{r:03d}-000000.tar"] if len(rows) else []
        skipped = {"corrupt": r, SHARD_REASON: 1}
        shares.append(RankShare(names, len(rows), top, skipped, stats))
    merged = merge_shares(shares, by_shard=True, continuous=True)
    assert merged["shards"] == ["train-r000-000000.tar", "train-r001-000000.tar"]
    assert (merged["count"], merged["num_classes"]) == (7, 3)
    assert merged["skipped"] == {"corrupt": 3, SHARD_REASON: 3}  # disjoint shards: summed
    for field in ("mean", "std", "count"):
        np.testing.assert_allclose(
            merged["latent_stats"][field], whole.as_dict()[field], rtol=1e-12
        )
    # Ranks that all read every shard each met the same unreadable one.
    by_sample = merge_shares(shares, by_shard=False, continuous=False)
    assert by_sample["skipped"] == {"corrupt": 3, SHARD_REASON: 1}
    assert "latent_stats" not in by_sample
