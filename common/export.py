"""What an exported Hub folder says about its training run: the model card, the training data and
the last results of the run folder a checkpoint was written in (``vistok.tokenizers.export``,
``vistok.generators.export``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vistok.common.hub import CARD


def run_folder(ckpt: Path) -> Path | None:
    """The run folder a checkpoint was written in (``<run>/checkpoints/x.ckpt``), if it is one."""
    run = ckpt.resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def training_data(run: Path | None) -> str:
    if run is None:
        return "not recorded (checkpoint outside a vistok run folder)"
    data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
    args = data.get("init_args") or {}
    shards = (
        args.get("train_shards") or "the embedded default dataset (crops of scikit-image photos)"
    )
    return f"{shards}, at {args.get('resolution')} px"


def last_results(run: Path | None) -> dict[str, Any] | None:
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
