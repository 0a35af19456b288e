"""Training checkpoint -> Hub folder with a model card (used by ``export.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from vistok.common.checkpoints import read_checkpoint
from vistok.common.hub import CARD, push_folder, save_pretrained


def run_folder(ckpt: Path) -> Path | None:
    """The run folder a checkpoint was written in (``<run>/checkpoints/x.ckpt``), if it is one."""
    run = ckpt.resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def _training_data(run: Path | None) -> str:
    if run is None:
        return "not recorded (checkpoint outside a vistok run folder)"
    data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
    args = data.get("init_args") or {}
    shards = (
        args.get("train_shards") or "the embedded default dataset (crops of scikit-image photos)"
    )
    return f"{shards}, at {args.get('resolution')} px"


def _results(run: Path | None) -> dict[str, Any] | None:
    path = run / "results.json" if run else None
    if not path or not path.is_file():
        return None
    history = json.loads(path.read_text())
    return history[-1] if history else None


def model_card(config: dict[str, Any], results: dict[str, Any] | None, image: str | None) -> str:
    info = config["info"]
    lines = [
        "---",
        "library_name: vistok",
        "tags: [image-tokenizer, vistok]",
        "---",
        "",
        f"# {info['family']} ({config['kind']})",
        "",
        f"- Code space: `{json.dumps(info.get('code_space'))}`",
        f"- Resolution: {info.get('resolution')} px; token grid {info.get('token_shape')}",
        f"- Weights: {config['weights']} ({'exponential moving average' if config['weights'] == 'ema' else 'raw training weights'})",  # noqa: E501
        f"- Training data: {config['training_data']}",
        f"- Trained for {config.get('global_step')} steps; exported from `{config['source']}`",
        "",
    ]
    if results:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |"
            for k, v in sorted(results["metrics"].items())
            if isinstance(v, (int, float))
        ]
        lines += [
            "",
            "Measured with this protocol:",
            "",
            "```json",
            json.dumps(results.get("protocol", {}), indent=2),
            "```",
            "",
        ]
    else:
        lines += ["No evaluation results were recorded for this checkpoint.", ""]
    if image:
        lines += [f"![reconstructions]({image})", "", "Top: originals; below: reconstructions.", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from vistok import load_tokenizer",
        "",
        'tok = load_tokenizer("<this folder or repo id>")',
        "codes = tok.tokenize(images)        # images: (B, 3, H, W) in [-1, 1]",
        "recon = tok.detokenize(codes)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(
    folder: Path, results: dict[str, Any] | None = None, image: str | None = None
) -> None:
    """The folder's README.md model card, from its config.json (tokenizer or generator)."""
    config = json.loads((folder / "config.json").read_text())
    card = model_card(config, results, image)
    if config["kind"] == "generator":
        # Each family's usual sampling settings (LlamaGen's CFG for AR, DiT's for diffusion).
        gpt = config["model"]["class_path"].endswith(".GPT")
        flags = "--cfg 2.0" if gpt else "--steps 50 --cfg 1.5"
        usage = (
            "## Use\n\n```bash\npython sample.py --generator <this folder or repo id> "
            f"--num-images 50000 {flags} --out samples/\n```\n"
        )
        card = card[: card.index("## Use")] + usage
    (folder / CARD).write_text(card)


def export_tokenizer(ckpt: str | Path, out: str | Path, ema: bool) -> Path:
    from vistok.data.codes import read_tokenizer

    ckpt = Path(ckpt)
    loaded = read_tokenizer(ckpt, ema=ema)
    if ema and not loaded.identity["ema"]:
        raise ValueError(f"{ckpt} has no EMA weights: export without --ema")
    run = run_folder(ckpt)
    info = {
        "info": loaded.tokenizer.describe(),
        "source_sha256": loaded.identity["sha256"],
        "weights": "ema" if ema else "raw",
        "source": ckpt.name,
        "global_step": read_checkpoint(ckpt).get("global_step"),
        "training_data": _training_data(run),
    }
    from vistok.tokenizers.posttrain import SOURCE_KEY, recorded_source

    source = recorded_source(ckpt)
    if source is not None:  # post-trained: the tokenizer whose codes it keeps, and their hash
        info[SOURCE_KEY] = source
    folder = save_pretrained(loaded.tokenizer, out, "tokenizer", info)
    grids = sorted((run / "images").glob("recon_*.png")) if run else []
    image = None
    if grids:
        shutil.copyfile(grids[-1], folder / "reconstructions.png")
        image = "reconstructions.png"
    write_card(folder, _results(run), image)
    return folder


def export_generator(ckpt: str | Path, out: str | Path, ema: bool) -> Path:
    """The GPT, and its tokenizer in ``tokenizer/`` (checked against the recorded hash), so the
    folder samples on its own."""
    from vistok.generators.inference import load_generator, resolve_tokenizer

    gen = load_generator(str(ckpt), ema=ema)
    recorded = gen.hparams["tokenizer_identity"]
    tok = resolve_tokenizer(recorded)
    gpt, args = gen.gpt, gen.gpt.config["init_args"]
    info = {
        "info": {
            "family": type(gpt).__name__,
            "code_space": args["code_space"],
            "token_shape": args["token_shape"],
            "resolution": tok.tokenizer.resolution,
            "num_classes": gpt.num_classes,
        },
        "weights": "ema" if gen.identity["ema"] else "raw",
        "source": Path(ckpt).name,
        "source_sha256": gen.identity["sha256"],
        "global_step": read_checkpoint(ckpt).get("global_step"),
        "training_data": "codes pre-extracted with the tokenizer in tokenizer/",
        "tokenizer_identity": recorded,
    }
    folder = save_pretrained(gpt, out, "generator", info)
    tok_info = {
        "info": tok.tokenizer.describe(),
        "source_sha256": recorded["sha256"],
        "weights": "ema" if tok.identity["ema"] else "raw",
    }
    save_pretrained(tok.tokenizer, folder / "tokenizer", "tokenizer", tok_info)
    write_card(folder)
    return folder


def export(
    ckpt: str,
    out: str,
    ema: bool = False,
    push: bool = False,
    repo_id: str | None = None,
    private: bool = False,
    api=None,
) -> Path:
    hparams = read_checkpoint(ckpt).get("hyper_parameters") or {}
    if "gpt_config" in hparams or "generator_config" in hparams:  # AR or diffusion generator
        folder = export_generator(ckpt, out, ema)
    elif "tokenizer" in hparams:
        folder = export_tokenizer(ckpt, out, ema)
    else:
        raise ValueError(f"{ckpt} is neither a tokenizer nor a generator training checkpoint")
    if push:
        if not repo_id:
            raise ValueError("--push needs --repo-id user/name")
        print(f"uploaded to {push_folder(folder, repo_id, private, api=api)}")
    return folder
