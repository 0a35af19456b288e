"""Lightning callbacks that evaluate a tokenizer during validation.

``ReconstructionEval`` measures, over up to ``num_images`` validation images, with the weights the
module validates with (its EMA weights when it keeps an average):

- ``val/rfid``: FID of the reconstructions against the same original images;
- ``val/pfid@<s>`` for each strength and ``val/pfid`` at the headline strength: FID of
  reconstructions decoded from perturbed codes (definition in :mod:`vistok.evaluation.pfid`);
- ``val/psnr_full``, ``val/ssim``, ``val/lpips``: per-image means over the same images;
- ``val/codebook_usage``, ``val/codebook_perplexity`` (index and group codes) and
  ``val/bit_entropy`` (group and bit codes), from the code histogram of the whole pass.

Continuous tokenizers (KL) get rFID, PSNR, SSIM and LPIPS only. The callback records what it
measured (images, reference set, strengths, seeds, weights) in its ``protocol`` attribute, which
``ResultsJSON`` writes next to the numbers.

The images. The callback reads the validation split itself (the datamodule's
``val_dataloader()``, this rank's share), independently of ``limit_val_batches``; each rank takes
at most its even share of ``num_images``. When ``num_images`` covers the split (the paper protocol:
all 50,000 ImageNet validation images), the set is the whole split whatever the number of
processes. When it does not, the set is the first images of each rank's stream, which depends on
the process count, data-loader workers and batch size; the reference id then names that layout.

The reference. FID compares with the Inception statistics of exactly the evaluated originals,
computed once with ``FID.load_or_compute_real`` and cached on disk under the data id, resolution
and image count (the count comes from a decode-only pass, once per process). FID keeps its
~95 MB Inception network, so the metric objects live on this callback, never on the module.

Distributed runs: every rank runs the pass on its share and every rank calls ``compute()`` (the
metrics all-reduce their sums); pFID draws are seeded per image key, so 2 processes give the
numbers 1 process gives on the same images. Work happens in ``on_validation_epoch_end``, which
Lightning calls on callbacks before the module swaps its EMA weights back out.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MeanMetric

from vistok.common.images import publish_grid
from vistok.common.summary import batch_progress
from vistok.data.default_dataset import VERSION
from vistok.evaluation.fid import FID
from vistok.evaluation.metrics import PSNR, SSIM, BitBalance, CodebookUsage
from vistok.evaluation.pfid import reconstruct_with_perturbations, strength_tag
from vistok.evaluation.ref_batch import fill_pool_reference
from vistok.losses.perceptual import LPIPS

DEFINITIONS = {
    "rfid": "FID(reconstructions, originals) of the evaluated images; Inception pool3",
    "pfid": "FID(decode(codes_to_latents(perturb(codes, s, per-image generator))), originals); "
    "see vistok.evaluation.pfid",
    "psnr_full": "mean over images of per-image PSNR (RGB, all pixels, clamped to [-1, 1])",
    "ssim": "mean SSIM, Gaussian window 11, sigma 1.5, images mapped to [0, 1]",
    "lpips": "mean LPIPS-VGG (v0.1 linear heads) at the evaluated resolution",
    "codebook_usage": "fraction of codes (per group, averaged) used at least once in the pass",
    "codebook_perplexity": "exp entropy of the pass's code histogram (per group, averaged)",
    "bit_entropy": "mean over bit positions of the binary entropy (bits) of the frequency of ones",
}


def _unpack(batch: Any, start: int, tag: str) -> tuple[Tensor, list[str]]:
    """Images (B, 3, H, W) and a key per image from a batch dict or tensor."""
    images = batch["image"] if isinstance(batch, dict) else batch
    images = images[0] if isinstance(images, (list, tuple)) else images
    keys = batch.get("key") if isinstance(batch, dict) else None
    if keys is None:  # no dataset keys: seeds then follow the stream position of this rank
        keys = [f"{tag}{start + i}" for i in range(images.shape[0])]
    return images, [str(k) for k in keys]


class ReconstructionEval(pl.Callback):
    """rFID, pFID, PSNR/SSIM/LPIPS and codebook statistics of the module's ``tokenizer``.

    Args:
        every_n_steps: evaluate at the first validation after every multiple of this many
            training steps; 0 evaluates at every validation. ``--evaluate`` always evaluates.
        num_images: images to evaluate (total over processes), capped by the validation split.
        fid_feature: Inception feature size (2048 is the standard FID; 64/192/768 are cheaper).
        fid_antialias: antialiased resize to 299 px instead of the TF-compatible bilinear one.
        pfid_strengths: perturbation strengths of the pFID curve, each in [0, 1].
        pfid_headline: the strength logged as ``val/pfid`` (added to the curve if missing).
        pfid_seed: base seed of the per-image perturbation and decoder-noise draws.
        lpips: compute LPIPS-VGG.
        grid_images: images in the ``images/perturb_<step>.png`` grid (0: no grid).
        dataset_id: names the validation data in the reference cache; default derived from the
            datamodule's ``val_shards``.
        stats_dir: reference-statistics cache; default ``$VISTOK_CACHE/fid_stats``.
        ref_batch: an ADM-format reference batch (``.npz``, see
            :mod:`vistok.evaluation.ref_batch`) whose statistics (stored ``mu``/``sigma``, else
            its images') replace those of the evaluated originals as the rFID/pFID reference,
            as papers that report rFID against a fixed ImageNet-val npz do. Needs 2048-d FID.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_images: int = 50_000,
        fid_feature: int = 2048,
        fid_antialias: bool = False,
        pfid_strengths: list[float] | None = None,
        pfid_headline: float = 0.5,
        pfid_seed: int = 0,
        lpips: bool = True,
        grid_images: int = 8,
        dataset_id: str | None = None,
        stats_dir: str | None = None,
        ref_batch: str | None = None,
    ):
        strengths = [0.25, 0.5, 1.0] if pfid_strengths is None else list(pfid_strengths)
        strengths = sorted({float(s) for s in [*strengths, pfid_headline]})
        if not all(0.0 <= s <= 1.0 for s in strengths):
            raise ValueError(f"pFID strengths must be in [0, 1], got {strengths}")
        if num_images < 2:
            raise ValueError(f"FID needs at least 2 images, got num_images={num_images}")
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.fid_feature, self.fid_antialias = fid_feature, fid_antialias
        self.strengths, self.headline = strengths, float(pfid_headline)
        self.seed, self.use_lpips, self.grid_images = pfid_seed, lpips, grid_images
        self.dataset_id, self.stats_dir, self.ref_batch = dataset_id, stats_dir, ref_batch
        self.protocol: dict[str, Any] | None = None  # read by ResultsJSON
        self._last_step = 0
        self._logged: set[str] = set()
        self._fids: dict[str, FID] = {}  # "rfid" and one per strength, sharing one Inception
        self._reference: dict[str, Any] | None = None
        self._lpips = None

    # --- Lightning hooks -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._due(trainer):
            return
        # No evaluation at this validation: Lightning keeps the last logged values, and
        # results.json would record them again under this step.
        for name in self._logged:
            trainer.callback_metrics.pop(name, None)
        self.protocol = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"ReconstructionEval needs a module with a .tokenizer, got {pl_module}")
        self._last_step = trainer.global_step
        # Metric states must be ordinary tensors (validation runs under inference mode).
        with torch.inference_mode(False), torch.no_grad():
            was_training = tokenizer.training
            tokenizer.eval()
            try:
                values, grid = self.evaluate(trainer, pl_module, tokenizer)
            finally:
                tokenizer.train(was_training)
        for name, value in values.items():
            # Already reduced over processes: every rank holds the same number.
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self._logged = set(values)
        if grid and trainer.is_global_zero:
            # Continuous tokenizers have no perturbation rows.
            labels = [
                "original",
                "reconstruction",
                *(f"s={strength_tag(s)}" for s in self.strengths),
            ]
            publish_grid(trainer, "perturb", grid, labels[: len(grid)])

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.state.fn == TrainerFn.VALIDATING or self.every_n_steps <= 0:
            return True
        n = self.every_n_steps
        return trainer.global_step // n > self._last_step // n

    # --- the evaluation ------------------------------------------------------------------------
    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tokenizer
    ) -> tuple[dict[str, float], list[Tensor]]:
        """One pass over the images; returns the logged values and the grid rows (rank 0)."""
        device, loader = pl_module.device, self._loader_factory(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        quota = self.num_images // world + int(rank < self.num_images % world)
        ref = self._ensure_reference(trainer, loader, quota, device)
        kind = tokenizer.code_space.kind
        strengths = self.strengths if kind != "continuous" else []
        for fid in self._fids.values():
            fid.reset_fake()
        metrics = self._pass_metrics(tokenizer, device)
        grid: list[list[Tensor]] = []
        for images, keys in batch_progress(self._share(loader, quota, rank), "rFID/pFID", quota):
            x = images.to(device).float()  # (B, 3, H, W) in [-1, 1]
            # The tokenizer runs at the trainer's precision, as in validation_step; the metric
            # networks (Inception, VGG) stay in float32 on the float outputs.
            with trainer.precision_plugin.forward_context():
                recon, perturbed, out = reconstruct_with_perturbations(
                    tokenizer, x, keys, strengths, self.seed
                )
            self._fids["rfid"].update(recon, real=False)
            for s, img in perturbed.items():
                self._fids[strength_tag(s)].update(img, real=False)
            self._update_pass_metrics(metrics, tokenizer, recon, x, out.codes)
            if trainer.is_global_zero:
                self._add_to_grid(grid, [x, recon, *perturbed.values()])
        values = {"val/rfid": self._fids["rfid"].compute()}
        for s in strengths:
            values[f"val/pfid@{strength_tag(s)}"] = self._fids[strength_tag(s)].compute()
        if strengths:
            values["val/pfid"] = values[f"val/pfid@{strength_tag(self.headline)}"]
        values.update(self._compute_pass_metrics(metrics))
        self.protocol = {"reconstruction_eval": self._protocol(trainer, pl_module, ref, kind)}
        rows = [torch.cat(r) for r in grid]
        return {k: float(v) for k, v in values.items()}, rows

    def _add_to_grid(self, grid: list[list[Tensor]], rows: list[Tensor]) -> None:
        have = sum(t.shape[0] for t in grid[0]) if grid else 0
        take = self.grid_images - have
        if take <= 0:
            return
        if not grid:
            grid.extend([] for _ in rows)
        for acc, r in zip(grid, rows):
            acc.append(r[:take].detach().cpu())

    # --- per-pass metrics ------------------------------------------------------------------
    def _pass_metrics(self, tokenizer, device) -> dict[str, Any]:
        space = tokenizer.code_space
        metrics: dict[str, Any] = {"psnr_full": PSNR(), "ssim": SSIM()}
        if self.use_lpips:
            if self._lpips is None:
                self._lpips = LPIPS()
            self._lpips.to(device)
            metrics["lpips"] = MeanMetric()
        if space.kind in ("index", "groups"):
            metrics["codebook"] = CodebookUsage(space.vocab_size, groups=space.groups)
        if space.kind in ("groups", "bits"):
            metrics["bits"] = BitBalance(space.bits)
        return {k: m.to(device) for k, m in metrics.items()}

    def _update_pass_metrics(self, metrics, tokenizer, recon, x, codes) -> None:
        metrics["psnr_full"].update(recon, x)
        metrics["ssim"].update(recon, x)
        if "lpips" in metrics:
            metrics["lpips"].update(self._lpips(recon, x))  # (B,)
        if "codebook" in metrics:
            metrics["codebook"].update(codes)
        if "bits" in metrics:
            kind = tokenizer.code_space.kind
            bits = tokenizer.quantizer.codes_to_bits(codes) if kind == "groups" else codes
            metrics["bits"].update(bits)  # (B, *S, bits)

    @staticmethod
    def _compute_pass_metrics(metrics: dict[str, Any]) -> dict[str, Tensor]:
        out = {
            f"val/{k}": metrics[k].compute() for k in ("psnr_full", "ssim", "lpips") if k in metrics
        }
        if "codebook" in metrics:
            usage = metrics["codebook"].compute()
            out["val/codebook_usage"] = usage["usage"]
            out["val/codebook_perplexity"] = usage["perplexity"]
        if "bits" in metrics:
            out["val/bit_entropy"] = metrics["bits"].compute()["entropy"]
        return out

    # --- images and reference ------------------------------------------------------------------
    @staticmethod
    def _loader_factory(trainer: pl.Trainer) -> Callable[[], Any]:
        data = trainer.datamodule
        if data is not None:
            return data.val_dataloader
        return lambda: trainer.val_dataloaders  # validate(model, dataloaders=...)

    @staticmethod
    def _share(
        loader: Callable[[], Any], quota: int, rank: int, state: dict | None = None
    ) -> Iterator[tuple[Tensor, list[str]]]:
        """This rank's images, at most ``quota``; ``state["truncated"]`` is set when the stream
        had more."""
        seen = 0
        for batch in loader():
            images, keys = _unpack(batch, seen, f"rank{rank}-")
            if seen >= quota:
                if state is not None:
                    state["truncated"] = True
                return
            take = min(images.shape[0], quota - seen)
            if take < images.shape[0] and state is not None:
                state["truncated"] = True
            yield images[:take], keys[:take]
            seen += take

    def _default_dataset_id(self, trainer: pl.Trainer) -> str:
        data = trainer.datamodule
        spec = getattr(data, "val_shards", None)
        if data is not None and spec is None and hasattr(data, "val_shards"):
            return f"vistok-default-{VERSION}-val"
        if spec:
            stem = Path(str(spec).split("::")[0]).parent.name or "val"
            return f"{stem}-{hashlib.sha1(str(spec).encode()).hexdigest()[:10]}"
        return f"{type(data).__name__ if data is not None else 'dataloaders'}-val"

    def _ensure_reference(self, trainer, loader, quota: int, device) -> dict[str, Any]:
        """Count the images (decode only), then load or compute their Inception statistics."""
        world = trainer.world_size
        if self._reference is not None and self._reference["world"] == world:
            return self._reference
        state = {"truncated": False}
        count, shape = 0, None
        for images, _ in self._share(loader, quota, trainer.global_rank, state):
            count, shape = count + images.shape[0], tuple(images.shape[-2:])
        # One collective for both: the total and whether any rank stopped before its end.
        totals = torch.tensor([count, int(state["truncated"])], device=device, dtype=torch.float64)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        count, subset = int(totals[0].item()), bool(totals[1].item())
        if count < 2:
            raise ValueError(f"the validation split gave {count} image(s); FID needs >= 2")
        if shape is None:  # this rank got no image: take the resolution from the datamodule
            res = int(trainer.datamodule.resolution)
            shape = (res, res)
        data_id = self.dataset_id or self._default_dataset_id(trainer)
        ref_id = data_id
        if subset:  # which images a prefix holds depends on the layout: never mix caches
            data = trainer.datamodule
            workers = getattr(data, "num_workers", "x")
            batch = getattr(data, "val_batch_size", "x")
            ref_id = f"{data_id}-first{self.num_images}-{world}ranks-{workers}workers-b{batch}"
        base = FID(self.fid_feature, antialias=self.fid_antialias, stats_dir=self.stats_dir)
        base = base.to(device)
        if self.ref_batch:  # a fixed reference instead of the originals' statistics
            batch = fill_pool_reference(base, self.ref_batch, shape, trainer.global_rank, world)
            ref_id, hit = batch["reference_batch"], batch["reference_statistics"]
        else:
            hit = base.load_or_compute_real(
                ref_id,
                lambda: (
                    im.to(device) for im, _ in self._share(loader, quota, trainer.global_rank)
                ),
                shape,
                count,
            )
        # Copies keep the reference and share the network (memo): one Inception in memory.
        names = ["rfid", *(strength_tag(s) for s in self.strengths)]
        memo = {id(base.inception): base.inception}
        self._fids = {n: copy.deepcopy(base, memo=dict(memo)) for n in names}
        self._reference = {
            "id": ref_id,
            "data_id": data_id,
            "images": count,
            "resolution": list(shape),
            "subset": subset,
            "cached": hit,
            "stats_key": base.stats_key(ref_id, shape, count),
            "world": world,
            "weights_sha256": base.weights_hash,
        }
        return self._reference

    def _protocol(self, trainer, pl_module, ref: dict[str, Any], kind: str) -> dict[str, Any]:
        quantizer = pl_module.tokenizer.quantizer
        discrete = kind != "continuous"
        subset = "first images of each rank's stream" if ref["subset"] else "whole split"
        return {
            "evaluated_at_step": trainer.global_step,
            "weights": "ema" if getattr(pl_module, "ema", None) is not None else "raw",
            "images": ref["images"],
            "images_requested": self.num_images,
            "image_set": f"validation split ({subset})",
            "resolution": ref["resolution"],
            "processes": trainer.world_size,
            "precision": str(trainer.precision),
            "reference": {
                "what": f"ADM reference batch {self.ref_batch}"
                if self.ref_batch
                else "Inception statistics of the same original images",
                "id": ref["id"],
                "stats_key": ref["stats_key"],
                "from_cache": ref["cached"],
            },
            "fid": {
                "network": "TF inception-2015-12-05, pool3",
                "feature": self.fid_feature,
                "resize": "antialiased" if self.fid_antialias else "TF bilinear (no antialias)",
                "input": "uint8-rounded images",
                "weights_sha256": ref["weights_sha256"],
            },
            "pfid": {
                "strengths": self.strengths,
                "headline": self.headline,
                "seed": self.seed,
                "per_image_seed": "sha256(f'{seed}|{strength}|{image key}')[:8] (63 bits)",
                "rule": f"{type(quantizer).__name__}.perturb: alpha = s, "
                f"delta = int({getattr(quantizer, 'perturb_max_delta', 100)} s)",
            }
            if discrete
            else None,
            "definitions": {
                k: v
                for k, v in DEFINITIONS.items()
                if discrete or k in ("rfid", "psnr_full", "ssim", "lpips")
            },
        }
