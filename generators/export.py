"""A training checkpoint -> Hub folder with a model card, pushed when asked (``export.py``): a
generator with its tokenizer beside it, or a tokenizer alone (``vistok.tokenizers.export``)."""

from __future__ import annotations

from pathlib import Path

from vistok.common.checkpoints import read_checkpoint
from vistok.common.export import write_card
from vistok.common.hub import push_folder, save_pretrained
from vistok.generators.checkpoint import NET_KEYS, load_generator
from vistok.tokenizers.checkpoint import resolve_tokenizer
from vistok.tokenizers.export import export_tokenizer


def export_generator(ckpt: str | Path, out: str | Path, ema: bool) -> Path:
    """The GPT, and its tokenizer in ``tokenizer/`` (checked against the recorded hash), so the
    folder samples on its own."""
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
    if any(key in hparams for key in NET_KEYS):  # AR or diffusion generator
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
