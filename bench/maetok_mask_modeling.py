"""Does MAETok's mask modeling give a latent space a diffusion model learns better? CPU-sized.

    python bench/maetok_mask_modeling.py [--resolution 32] [--tok-steps 300] [--dit-steps 600]
        [--num-images 128] [--threads 2] [--out runs/bench_maetok]

The same tiny 1D ViT autoencoder (``Tokenizer1D`` preset ``maetok_b128`` shrunk: patch 4, width
64, 2 blocks each side, 16 latent tokens of 8 channels, identity bottleneck) is trained twice on
the embedded dataset (crops of 10 photos, label = photo) for the same steps, same seed, same
batches, L1 loss:
- ``plain``: no masking (mask ratio [0, 0]: the encoder sees every patch);
- ``masked``: MAETok's mask modeling, 40-60% of the patches masked per batch, plus one HOG
  auxiliary decoder (``MaskModeling``, 1 block) on the masked patches.
Then the same tiny flow-matching DiT (``FlowMatching`` preset tiny, class-conditional, latents
normalised per channel) is trained on each latent space for the same steps. Reported:
- rFID: FID of the reconstructions of the validation images against those images;
- gFID: FID of class-balanced samples (Euler, ``--sample-steps``, no guidance) against them;
- PSNR of the reconstructions;
- linear probe: accuracy of a logistic regression from the flattened latents to the photo
  label (train split -> validation split);
- GMM modes: per-image latents, standardised and PCA-whitened to 16 dims, fitted by Gaussian
  mixtures of 1..16 components; the table gives the mean negative log-likelihood per image for
  each size and the smallest size that reaches a shared target (the larger of the two arms'
  NLLs at 16 components), the paper's measure of how many modes a latent space has.
FID here uses a few hundred 32 px images upsampled to 299 px: far from the ImageNet protocol,
only the two arms are comparable with each other. Plain PyTorch loops over the project's
modules (no Lightning): the bench measures the method, not the trainer.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vistok.data.default_dataset import default_shards, num_classes
from vistok.evaluation.fid import FID
from vistok.generators.diffusion import DiffusionSampling, FlowMatching
from vistok.tokenizers.mask_modeling import MaskModeling
from vistok.tokenizers.titok import Tokenizer1D


def load_split(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split of the embedded dataset, (N, 3, r, r) in [-1, 1], and labels (N,)."""
    import braceexpand

    images, labels = [], []
    for path in braceexpand.braceexpand(default_shards(split)):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                img = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
                images.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1))
                cls = tar.extractfile(members[name[:-4] + ".cls"]).read()
                labels.append(int(cls))
    return torch.stack(images).float() / 127.5 - 1, torch.tensor(labels)


def build_tokenizer(args, masked: bool) -> Tokenizer1D:
    torch.manual_seed(args.seed)
    return Tokenizer1D(
        "maetok_b128",
        resolution=args.resolution,
        patch_size=4,
        channels=64,
        num_res_blocks=2,
        num_heads=2,
        num_latents=16,
        code_dim=8,
        mask_ratio=[0.4, 0.6] if masked else [0.0, 0.0],
    )


def train_tokenizer(args, train_x: torch.Tensor, masked: bool):
    tok = build_tokenizer(args, masked)
    aux = None
    params = list(tok.parameters())
    if masked:
        aux = MaskModeling(hog_weight=1.0, hog_cell=4, depth=1).bind(tok)
        params += list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)  # same batches and masks draws for both arms
    tok.train()
    for step in range(args.tok_steps):
        idx = torch.randint(len(train_x), (args.batch,), generator=gen)
        x = train_x[idx]
        mask = tok.sample_patch_mask(len(x), generator=gen)  # (B, N); none masked when plain
        q = tok.quantizer(tok.pre_quant(x, patch_mask=mask))
        loss = (tok.decode(q.quantized) - x).abs().mean()
        if aux is not None:
            aux_loss, _ = aux(x, q.quantized, mask)
            loss = loss + aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 500 == 0 or step == args.tok_steps - 1:
            print(f"  tokenizer {'masked' if masked else 'plain'} step {step}: {loss.item():.4f}")
    return tok.eval()


@torch.no_grad()
def encode_all(tok, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tok.encode(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def decode_all(tok, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tok.decode(z[i : i + batch]) for i in range(0, len(z), batch)]).clamp(-1, 1)


def train_dit(args, latents: torch.Tensor, labels: torch.Tensor, tok) -> FlowMatching:
    torch.manual_seed(args.seed)
    dit = FlowMatching(
        tok.code_space.to_dict(), list(tok.token_shape), num_classes=num_classes(), preset="tiny"
    )
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1)  # (C, N * K)
    dit.set_latent_stats(flat.mean(1), flat.std(1))
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.dit_steps):
        idx = torch.randint(len(latents), (args.batch * 2,), generator=gen)
        loss, _ = dit.loss(latents[idx], labels[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        if step % 1000 == 0 or step == args.dit_steps - 1:
            print(f"  DiT step {step}: {loss.item():.4f}")
    return dit.eval()


def fid_of(fid: FID, images: torch.Tensor) -> float:
    fid.reset()  # keeps the reference features
    for i in range(0, len(images), 64):
        fid.update(images[i : i + 64], real=False)
    return float(fid.compute())


def linear_probe(train_z, train_y, val_z, val_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_z)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_z), train_y)
    return float(clf.score(scaler.transform(val_z), val_y))


def gmm_nll(z: np.ndarray, sizes: list[int], seed: int) -> dict[int, float]:
    """Mean NLL per image of Gaussian mixtures of each size on standardised, PCA-whitened z."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    w = PCA(n_components=16, whiten=True, random_state=seed).fit_transform(z)
    return {
        k: float(-GaussianMixture(k, covariance_type="full", random_state=seed).fit(w).score(w))
        for k in sizes
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--tok-steps", type=int, default=300)
    p.add_argument("--dit-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_maetok")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    train_x, train_y = load_split("train", args.resolution)
    val_x, val_y = load_split("val", args.resolution)
    val_x, val_y = val_x[: args.num_images], val_y[: args.num_images]
    print(f"data: {len(train_x)} train / {len(val_x)} val images at {args.resolution} px")
    fid = FID()
    for i in range(0, len(val_x), 64):
        fid.update(val_x[i : i + 64], real=True)
    sizes = [1, 2, 4, 8, 16]
    results = {}
    for arm in ("plain", "masked"):
        t0 = time.time()
        tok = train_tokenizer(args, train_x, masked=arm == "masked")
        z_train, z_val = encode_all(tok, train_x), encode_all(tok, val_x)  # (N, C, K)
        recon = decode_all(tok, z_val)
        mse = (recon - val_x).pow(2).flatten(1).mean(1)
        dit = train_dit(args, z_train, train_y, tok)
        labels = torch.arange(args.num_images) % num_classes()
        g = torch.Generator().manual_seed(args.seed)
        cfg = DiffusionSampling(steps=args.sample_steps, sampler="euler")
        samples = decode_all(tok, dit.generate(labels, cfg, generator=g))
        flat_train, flat_val = z_train.flatten(1).numpy(), z_val.flatten(1).numpy()
        results[arm] = {
            "rfid": fid_of(fid, recon),
            "gfid": fid_of(fid, samples),
            "psnr": float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()),
            "linear_probe": linear_probe(flat_train, train_y.numpy(), flat_val, val_y.numpy()),
            "gmm_nll": gmm_nll(flat_train, sizes, args.seed),
            "seconds": round(time.time() - t0, 1),
        }
        print(f"{arm}: {json.dumps(results[arm])}")
    target = max(results[a]["gmm_nll"][sizes[-1]] for a in results)
    for arm in results:
        nll = results[arm]["gmm_nll"]
        results[arm]["gmm_modes_to_target"] = min(k for k in sizes if nll[k] <= target + 1e-9)
    print(f"\nGMM NLL target (per image, 16 whitened dims): {target:.3f}")
    print("| arm | rFID | gFID | PSNR | linear probe | GMM modes to target | NLL k=1 | NLL k=16 |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        nll = r["gmm_nll"]
        print(
            f"| {arm} | {r['rfid']:.2f} | {r['gfid']:.2f} | {r['psnr']:.2f} | "
            f"{r['linear_probe']:.3f} | {r['gmm_modes_to_target']} | {nll[1]:.2f} | "
            f"{nll[sizes[-1]]:.2f} |"
        )
    summary = {
        "protocol": {**vars(args), "fid_reference": f"{len(val_x)} val images", "gmm_sizes": sizes},
        "results": results,
        "gmm_nll_target": target,
        "minutes": round((time.time() - start) / 60, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"total {summary['minutes']} min; written to {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
