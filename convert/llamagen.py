"""LlamaGen checkpoints (https://github.com/FoundationVision/LlamaGen) as vistok exports.

- ``llamagen-vq``: ``{'model': state_dict}`` of ``tokenizer/tokenizer_image/vq_model.py``'s
  VQModel (VQ-8, VQ-16, any codebook size / dim) -> a ``VQTokenizer`` in the taming layout
  (``llamagen_vq16`` / ``llamagen_vq8`` presets; the width, levels, blocks and codebook are read
  from the shapes). LlamaGen's separate q/k/v 1x1 convs become the fused ``qkv`` conv, the
  1x1 ``quant_conv`` / ``post_quant_conv`` become ``proj_in`` / ``proj_out``. The codebook is
  l2-normalised, as in every released LlamaGen VQ (``codebook_l2_norm=True``; the flag is not
  stored in the checkpoint). ``quantize.codebook_used`` (a training-time usage log) is dropped.
- ``llamagen-gpt``: ``{'model': state_dict}`` of ``autoregressive/models/gpt.py``'s c2i
  Transformer (GPT-B/L/XL/XXL/XXXL) -> a vistok ``GPT`` over the codes of ``--tokenizer`` (a
  converted LlamaGen VQ folder, copied into ``tokenizer/`` so the export samples on its own). The
  class embedding keeps its null class (last row), the token grid (2D RoPE) is the tokenizer's,
  and the vocabulary must equal its codebook. LlamaGen stores no head count; it is read from the
  KV-cache buffers when the checkpoint has them, else from LlamaGen's model table by width.

``--ema`` takes the checkpoint's ``ema`` state dict (LlamaGen's ``--ema`` training runs).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from typing_extensions import Unpack

from vistok.common.hub import CARD, CONFIG, WEIGHTS
from vistok.convert.common import (
    ConversionError,
    Options,
    State,
    count_indexed,
    fill_state,
    option_values,
    read_checkpoint,
    rename,
    require,
    state_entry,
    write_export,
)
from vistok.generators.ar import GPT
from vistok.generators.layers import ffn_hidden
from vistok.tokenizers.checkpoint import read_tokenizer
from vistok.tokenizers.vq import VQTokenizer

VQ = "llamagen-vq"
GPT_FORMAT = "llamagen-gpt"
DEFAULT_RESOLUTION = 256  # LlamaGen's ImageNet models
TRAINING_DATA = "ImageNet-1k train (LlamaGen's release), converted with python -m vistok.convert"

# ---------------------------------------------------------------------------------------------
# Helpers


def _model_state(path: str, fmt: str, ema: bool) -> State:
    ckpt = read_checkpoint(path, fmt)
    if ema and "ema" not in ckpt:
        raise ConversionError(
            f"{path} has no 'ema' weights (top-level keys: {sorted(ckpt)}): convert without --ema"
        )
    return state_entry(ckpt, "ema" if ema else "model", path, fmt)


def _fuse_qkv(state: State) -> State:
    """LlamaGen's attention blocks keep q, k, v as three 1x1 convs; vistok fuses them (same
    function: the fused conv's output is their concatenation)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".q.weight")]:
        base = key[: -len("q.weight")]
        for part in ("weight", "bias"):
            names = [f"{base}{n}.{part}" for n in "qkv"]
            if all(n in out for n in names):
                out[f"{base}qkv.{part}"] = torch.cat([out.pop(n) for n in names])
    return out


# ---------------------------------------------------------------------------------------------
# VQ tokenizer

_RES = r"(norm1|conv1|norm2|conv2)\.(weight|bias)"
_ATTN = r"(norm|qkv)\.(weight|bias)"
VQ_RULES = [
    (
        rf"(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.{_RES}",
        r"\1.levels.\2.blocks.\3.\4.\5",
    ),
    (
        r"(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.nin_shortcut\.(weight|bias)",
        r"\1.levels.\2.blocks.\3.shortcut.\4",
    ),
    (
        rf"(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.{_ATTN}",
        r"\1.levels.\2.attn.\3.\4.\5",
    ),
    (
        r"(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.proj_out\.(weight|bias)",
        r"\1.levels.\2.attn.\3.proj.\4",
    ),
    (
        r"encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(weight|bias)",
        r"encoder.levels.\1.down.conv.\2",
    ),
    (
        r"decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(weight|bias)",
        r"decoder.levels.\1.up.conv.\2",
    ),
    (rf"(encoder|decoder)\.mid\.(\d+)\.{_RES}", r"\1.mid.layers.\2.\3.\4"),
    (rf"(encoder|decoder)\.mid\.(\d+)\.{_ATTN}", r"\1.mid.layers.\2.\3.\4"),
    (r"(encoder|decoder)\.mid\.(\d+)\.proj_out\.(weight|bias)", r"\1.mid.layers.\2.proj.\3"),
    (r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)", r"\1.\2.\3"),
    (r"quant_conv\.(weight|bias)", r"proj_in.\1"),
    (r"post_quant_conv\.(weight|bias)", r"proj_out.\1"),
    (r"quantize\.embedding\.weight", "quantizer.codebook"),
]
VQ_IGNORED = [r"quantize\.codebook_used"]  # LlamaGen's training-time usage log
VQ_FRESH = ("quantizer.usage_ema", "quantizer.step")  # vistok's training-time counters


def vq_architecture(state: State, path: str) -> dict:
    """VQTokenizer arguments read from a LlamaGen VQModel state dict's shapes."""
    width = require(state, "encoder.conv_in.weight", path, VQ).shape[0]
    levels = count_indexed(state, "encoder.conv_blocks.")
    mult = []
    for i in range(levels):
        out = require(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", path, VQ).shape[0]
        if out % width:
            raise ConversionError(f"{path}: level {i} width {out} is not a multiple of {width}")
        mult.append(out // width)
    codebook_size, codebook_dim = require(state, "quantize.embedding.weight", path, VQ).shape
    mid_attention = "encoder.mid.1.q.weight" in state
    return dict(
        channels=width,
        channel_mult=mult,
        num_res_blocks=count_indexed(state, "encoder.conv_blocks.0.res."),
        decoder_res_blocks=count_indexed(state, "decoder.conv_blocks.0.res."),
        z_channels=require(state, "encoder.conv_out.weight", path, VQ).shape[0],
        mid_attention=mid_attention,
        num_mid_blocks=count_indexed(state, "encoder.mid.") - int(mid_attention),
        level_attention=f"encoder.conv_blocks.{levels - 1}.attn.0.q.weight" in state,
        codebook_size=int(codebook_size),
        codebook_dim=int(codebook_dim),
    )


def map_vq_state(state: State, path: str) -> tuple[State, dict[str, str]]:
    """LlamaGen VQModel keys -> VQTokenizer keys (and, per new key, its source key)."""
    mapped, sources = rename(_fuse_qkv(state), VQ_RULES, VQ_IGNORED, path, VQ)
    for key in ("proj_in.weight", "proj_out.weight"):  # 1x1 convs (O, I, 1, 1) -> linear (O, I)
        if key in mapped and mapped[key].dim() == 4 and mapped[key].shape[2:] == (1, 1):
            mapped[key] = mapped[key].flatten(1)
    return mapped, sources


def convert_vq(checkpoint: str, out: str, **options: Unpack[Options]) -> Path:
    ema, tokenizer, resolution = option_values(**options)
    if tokenizer is not None:
        raise ConversionError("--tokenizer applies to llamagen-gpt only; drop it for a VQ")
    state = _model_state(checkpoint, VQ, ema)
    arch = vq_architecture(state, checkpoint)
    # The preset gives LlamaGen's fixed choices (norm groups, padding); the shapes give the rest.
    tok = VQTokenizer(preset="llamagen_vq16", resolution=resolution or DEFAULT_RESOLUTION, **arch)
    mapped, sources = map_vq_state(state, checkpoint)
    fill_state(tok, mapped, sources, checkpoint, VQ, fresh=VQ_FRESH)
    info = {
        "info": tok.describe(),
        "weights": "ema" if ema else "raw",
        "training_data": TRAINING_DATA,
        "reference": {"format": VQ, "architecture": arch},
    }
    return write_export(tok, out, "tokenizer", checkpoint, info)


# ---------------------------------------------------------------------------------------------
# GPT

GPT_RULES = [
    (r"cls_embedding\.embedding_table\.weight", "class_embed.weight"),
    (r"tok_embeddings\.weight", "head.token_embed.weight"),
    (r"output\.weight", "head.out.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"layers\.(\d+)\.attention\.wqkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"blocks.\1.attn.proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight", r"blocks.\1.ffn.\2.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"blocks.\1.ffn_norm.weight"),
]
GPT_IGNORED = [r"layers\.\d+\.attention\.kv_cache\.(k|v)_cache"]  # sampling scratch space
# LlamaGen's class-conditional models (autoregressive/models/gpt.py GPT_models): width -> heads.
LLAMAGEN_HEADS = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2560: 40}
# LlamaGen's class-token rotary row, and its c2i training dropout
# (autoregressive/train/train_c2i.py), which a fine-tuning run continues.
LLAMAGEN_GPT = dict(
    class_rope="zero", dropout=0.1, attn_dropout=0.0, token_dropout=0.1, label_dropout=0.1
)


def _heads(state: State, dim: int, path: str) -> int:
    cache = state.get("layers.0.attention.kv_cache.k_cache")  # (batch, heads, length, head_dim)
    if cache is not None:
        if cache.shape[1] * cache.shape[3] != dim:
            raise ConversionError(f"{path}: KV cache {tuple(cache.shape)} does not fit width {dim}")
        return int(cache.shape[1])
    if dim not in LLAMAGEN_HEADS:
        raise ConversionError(
            f"{path}: width {dim} is none of LlamaGen's c2i models ({sorted(LLAMAGEN_HEADS)}) and "
            "the checkpoint keeps no KV cache to read the head count from"
        )
    return LLAMAGEN_HEADS[dim]


def convert_gpt(checkpoint: str, out: str, **options: Unpack[Options]) -> Path:
    ema, tokenizer, resolution = option_values(**options)
    if tokenizer is None:
        raise ConversionError(
            "llamagen-gpt needs --tokenizer FOLDER: the LlamaGen VQ this GPT was trained on, "
            "converted first (python -m vistok.convert llamagen-vq vq_ds16_c2i.pt --out vq16/)"
        )
    if resolution is not None:
        raise ConversionError(
            "--resolution applies to tokenizer formats: the GPT's token grid is its tokenizer's "
            "(convert the VQ with --resolution, e.g. 384 for LlamaGen's 384 px GPTs)"
        )
    tok = read_tokenizer(tokenizer)
    space, grid = tok.tokenizer.code_space, tuple(tok.tokenizer.token_shape)
    state = _model_state(checkpoint, GPT_FORMAT, ema)
    vocab, dim = require(state, "tok_embeddings.weight", checkpoint, GPT_FORMAT).shape
    if space.kind != "index" or vocab != space.vocab_size:
        raise ConversionError(
            f"{checkpoint} predicts {vocab} codes but the tokenizer {tokenizer} has "
            f"{space.vocab_size if space.kind == 'index' else space.kind + ' codes'}: give "
            "--tokenizer the converted VQ this GPT was trained on (same codebook size)"
        )
    classes = require(state, "cls_embedding.embedding_table.weight", checkpoint, GPT_FORMAT)
    qkv = require(state, "layers.0.attention.wqkv.weight", checkpoint, GPT_FORMAT)
    if qkv.shape[0] != 3 * dim:
        raise ConversionError(
            f"{checkpoint}: wqkv has {qkv.shape[0]} rows, not 3 x {dim}: grouped-query attention "
            "(n_kv_head) is not supported"
        )
    hidden = require(state, "layers.0.feed_forward.w1.weight", checkpoint, GPT_FORMAT).shape[0]
    if hidden != ffn_hidden(dim):
        raise ConversionError(
            f"{checkpoint}: FFN width {hidden}, but LlamaGen's rule gives {ffn_hidden(dim)} for "
            f"width {dim} (ffn_dim_multiplier / multiple_of changed): not supported"
        )
    cache = state.get("layers.0.attention.kv_cache.k_cache")
    if cache is not None and cache.shape[2] < 1 + math.prod(grid):
        raise ConversionError(
            f"{checkpoint} was set up for at most {cache.shape[2] - 1} image tokens, but the "
            f"tokenizer's grid is {grid} at {tok.tokenizer.resolution} px: convert the VQ with "
            "the --resolution this GPT was trained at"
        )
    gpt = GPT(
        code_space=space.to_dict(),
        token_shape=list(grid),
        num_classes=classes.shape[0] - 1,  # the last row is the null class
        depth=count_indexed(state, "layers."),
        dim=int(dim),
        heads=_heads(state, int(dim), checkpoint),
        **LLAMAGEN_GPT,
    )
    mapped, sources = rename(state, GPT_RULES, GPT_IGNORED, checkpoint, GPT_FORMAT)
    fill_state(gpt, mapped, sources, checkpoint, GPT_FORMAT)
    info = {
        "info": {
            "family": "GPT",
            "code_space": space.to_dict(),
            "token_shape": list(grid),
            "resolution": tok.tokenizer.resolution,
            "num_classes": gpt.num_classes,
        },
        "weights": "ema" if ema else "raw",
        "training_data": TRAINING_DATA,
        "tokenizer_identity": tok.identity,
        "reference": {"format": GPT_FORMAT, "depth": gpt.depth, "dim": gpt.dim},
    }
    folder = write_export(gpt, out, "generator", checkpoint, info)
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in (WEIGHTS, CONFIG, CARD):  # the tokenizer folder as it is: same identity
        if (Path(tokenizer) / name).is_file():
            shutil.copyfile(Path(tokenizer) / name, folder / "tokenizer" / name)
    return folder
