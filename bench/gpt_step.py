"""The GPT training step, alone or side by side with LlamaGen's at the same size.

A step is forward + cross-entropy + backward + gradient clipping (1.0) + AdamW (LlamaGen's
groups: weight decay 0.05 on tensors with >= 2 dims), on random codes and labels, in training
mode with LlamaGen's c2i dropouts (residual / FFN 0.1, attention 0, token 0.1, label 0.1).
Defaults: GPT-B (111M parameters with 16384 codes and 1000 classes), a 16 x 16 grid, batch 4,
fp32, on the CPU.

    python bench/gpt_step.py                              # vistok's GPT-B step
    python bench/gpt_step.py --llamagen ~/src/LlamaGen    # + LlamaGen's, interleaved
    python bench/gpt_step.py --llamagen ~/src/LlamaGen --components --ops 15

``--llamagen PATH`` is a checkout of https://github.com/FoundationVision/LlamaGen; its
``autoregressive/models/gpt.py`` is imported from there. Both models are built at the same size,
LlamaGen's initial weights are copied into vistok's GPT through the checkpoint converter's key
map, and the two are checked to compute the same logits before anything is timed. The steps then
alternate A, B, A, B, ... and each side reports its best of ``--repeats``: on a shared machine
alternating spreads background load over both sides, and the best run is the least disturbed.

``--components`` times forward + backward of each part of a step in isolation, at the step's
shapes, best of ``--repeats``, times how often a step runs it (per layer: x depth); ``--ops N``
prints torch.profiler's N most expensive operators of one step of each model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vistok.convert.common import rename
from vistok.convert.llamagen import GPT_IGNORED, GPT_RULES, LLAMAGEN_GPT
from vistok.generators.ar import GPT, GPT_PRESETS, token_loss
from vistok.generators.layers import apply_rope
from vistok.generators.training import decay_groups

Step = Callable[[], None]
Parts = dict[str, tuple[int, Callable[[], object]]]  # name -> (runs per step, forward)


# ---------------------------------------------------------------------------------------------
# Models and steps


def build_vistok(a) -> GPT:
    space = {"kind": "index", "vocab_size": a.vocab, "channels": 8}
    sizes = {k: getattr(a, k) for k in ("depth", "dim", "heads") if getattr(a, k)}
    return GPT(space, [a.side, a.side], a.classes, a.preset, **sizes, **LLAMAGEN_GPT)


def import_llamagen(path: str):
    """LlamaGen's gpt module from a checkout (it imports its own top-level ``utils``)."""
    root = Path(path).expanduser().resolve()
    if not (root / "autoregressive" / "models" / "gpt.py").is_file():
        sys.exit(f"error: {root} holds no autoregressive/models/gpt.py: give a LlamaGen checkout")
    if "utils" in sys.modules:
        sys.exit("error: a top-level 'utils' module is already imported; LlamaGen needs its own")
    sys.path.insert(0, str(root))
    from autoregressive.models import gpt  # noqa: PLC0415 (a user's checkout, found at run time)

    return gpt


def build_llamagen(lg, net: GPT, a) -> nn.Module:
    """LlamaGen's c2i Transformer at ``net``'s size, with its training defaults (dropouts)."""
    args = lg.ModelArgs(
        dim=net.dim,
        n_layer=net.depth,
        n_head=net.heads,
        vocab_size=a.vocab,
        num_classes=a.classes,
        block_size=a.side * a.side,
        cls_token_num=1,
        model_type="c2i",
    )
    return lg.Transformer(args)


def same_function(net: GPT, ref: nn.Module, codes: Tensor, labels: Tensor) -> float:
    """Load ``ref``'s weights into ``net``; the largest logit difference in eval mode."""
    mapped, _ = rename(ref.state_dict(), GPT_RULES, GPT_IGNORED, "LlamaGen", "llamagen-gpt")
    net.load_state_dict(mapped)
    # LlamaGen zeroes its output layer at init: give both the same random one, or every logit is 0.
    with torch.no_grad():
        ref.output.weight.normal_(std=0.02)
        net.head.out.weight.copy_(ref.output.weight)
    net.eval()
    ref.eval()
    seq = codes.flatten(1)
    with torch.no_grad():
        ours = net(codes, labels)[:, :, 0]  # (B, N, V)
        theirs, _ = ref(idx=seq[:, :-1], cond_idx=labels, input_pos=torch.arange(seq.shape[1]))
    net.train()
    ref.train()
    return (ours - theirs).abs().max().item()


def optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """LlamaGen's AdamW (lr 1e-4, betas 0.9 / 0.95, weight decay 0.05), as ``ARModule``'s."""
    groups = decay_groups(list(model.parameters()), 0.05)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused)


def make_step(model: nn.Module, loss: Callable[[], Tensor], fused: bool) -> Step:
    opt = optimizer(model, fused)

    def step() -> None:
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def llamagen_loss(ref: nn.Module, codes: Tensor, labels: Tensor) -> Callable[[], Tensor]:
    seq = codes.flatten(1)  # (B, N)
    return lambda: ref(idx=seq[:, :-1], cond_idx=labels, targets=seq)[1]


# ---------------------------------------------------------------------------------------------
# Components


def vistok_parts(net: GPT, codes: Tensor, labels: Tensor) -> Parts:
    b, n, d, h = codes.shape[0], net.num_tokens, net.dim, net.heads
    block = net.blocks[0]
    x = torch.randn(b, n, d, requires_grad=True)
    qkv = torch.randn(b, n, 3 * d, requires_grad=True)
    q, k = (torch.randn(b, h, n, d // h, requires_grad=True) for _ in range(2))
    cos, sin = net.rope_cos[:n], net.rope_sin[:n]
    seq = net.to_sequence(codes)  # (B, N, 1)
    inputs = seq[:, :-1]
    logits = torch.zeros(b, n, 1, net.head.vocab, requires_grad=True)

    def split(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return rearrange(t, "b t (three h d) -> three b h t d", three=3, h=h)

    def attention() -> Tensor:
        out = F.scaled_dot_product_attention(q, k, split(qkv)[2], is_causal=True)
        return rearrange(out, "b h t d -> b t (h d)")

    return {
        "embeddings (class, codes, token dropout)": (1, lambda: net.input_sequence(inputs, labels)),
        "RMSNorm": (2 * net.depth + 1, lambda: block.attn_norm(x)),
        "qkv projection": (net.depth, lambda: block.attn.qkv(x)),
        "RoPE (q and k)": (net.depth, lambda: [apply_rope(t, cos, sin) for t in split(qkv)[:2]]),
        "attention (SDPA, causal)": (net.depth, attention),
        "attention output projection": (net.depth, lambda: block.attn.proj(x)),
        "SwiGLU MLP": (net.depth, lambda: swiglu(block.ffn, x)),
        "dropout (residual, FFN)": (2 * net.depth, lambda: block.attn.resid_dropout(x)),
        "head (logits)": (1, lambda: net.head.logits(x, seq)),
        "loss (cross-entropy, stats)": (1, lambda: token_loss(logits, seq)[0]),
    }


def llamagen_parts(lg, ref: nn.Module, codes: Tensor, labels: Tensor) -> Parts:
    seq = codes.flatten(1)
    b, n = seq.shape
    layer, cfg = ref.layers[0], ref.config
    d, h = cfg.dim, cfg.n_head
    x = torch.randn(b, n, d, requires_grad=True)
    qkv = torch.randn(b, n, 3 * d, requires_grad=True)
    q, k = (torch.randn(b, n, h, d // h, requires_grad=True) for _ in range(2))
    freqs, rope = ref.freqs_cis[:n], lg.apply_rotary_emb
    logits = torch.zeros(b, n, cfg.vocab_size, requires_grad=True)

    def split(t: Tensor) -> list[Tensor]:
        return [u.view(b, n, h, d // h) for u in t.split(d, dim=-1)]

    def embeddings() -> Tensor:
        cls = ref.cls_embedding(labels, train=True)
        return ref.tok_dropout(torch.cat([cls, ref.tok_embeddings(seq[:, :-1])], dim=1))

    def attention() -> Tensor:
        v = split(qkv)[2].transpose(1, 2)
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, N, Dh), strided like the model's
        out = F.scaled_dot_product_attention(qt, kt, v, is_causal=True)
        return out.transpose(1, 2).contiguous().view(b, n, d)

    def loss() -> Tensor:
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), seq.reshape(-1))

    return {
        "embeddings (class, codes, token dropout)": (1, embeddings),
        "RMSNorm": (2 * cfg.n_layer + 1, lambda: layer.attention_norm(x)),
        "qkv projection": (cfg.n_layer, lambda: layer.attention.wqkv(x)),
        "RoPE (q and k)": (cfg.n_layer, lambda: [rope(t, freqs) for t in split(qkv)[:2]]),
        "attention (SDPA, causal)": (cfg.n_layer, attention),
        "attention output projection": (cfg.n_layer, lambda: layer.attention.wo(x)),
        "SwiGLU MLP": (cfg.n_layer, lambda: swiglu(layer.feed_forward, x)),
        "dropout (residual, FFN)": (2 * cfg.n_layer, lambda: layer.attention.resid_dropout(x)),
        "head (logits)": (1, lambda: ref.output(x).float()),
        "loss (cross-entropy, stats)": (1, loss),
    }


def swiglu(ffn: nn.Module, x: Tensor) -> Tensor:
    """Either side's MLP (same weight names) without its dropout, which has its own line."""
    return ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))


def forward_backward(forward: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        out = forward()
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def optimizer_part(model: nn.Module, fused: bool) -> Callable[[], None]:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = optimizer(model, fused)

    def run() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def components(sides: dict[str, Parts], optimizers: dict[str, Callable[[], None]], a) -> None:
    names = list(next(iter(sides.values())))
    print(f"\nper component, forward + backward, ms per step (best of {a.repeats}, x runs/step)")
    print(f"{'component':<42}{'runs':>5}" + "".join(f"{s:>12}" for s in sides))
    totals = dict.fromkeys(sides, 0.0)
    rows = [
        (
            name,
            {s: (parts[name][0], forward_backward(parts[name][1])) for s, parts in sides.items()},
        )
        for name in names
    ]
    rows.append(("optimizer (clip + AdamW)", {s: (1, run) for s, run in optimizers.items()}))
    for name, per_side in rows:
        cells = ""
        for side, (count, run) in per_side.items():
            ms = 1000 * count * best_time(run, a.repeats, warmup=1)
            totals[side] += ms
            cells += f"{ms:>12.1f}"
        print(f"{name:<42}{next(iter(per_side.values()))[0]:>5}{cells}")
    print(f"{'sum':<47}" + "".join(f"{t:>12.1f}" for t in totals.values()))


# ---------------------------------------------------------------------------------------------
# Timing


def best_time(run: Callable[[], None], repeats: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(steps: dict[str, Step], repeats: int) -> dict[str, list[float]]:
    for step in steps.values():  # warm-up: allocator, optimizer state
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


@contextmanager
def seeded(seed: int):
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def top_ops(step: Step, rows: int) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="B", choices=sorted(GPT_PRESETS))
    p.add_argument("--depth", type=int, help="override the preset's depth (a quicker check)")
    p.add_argument("--dim", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--side", type=int, default=16, help="code grid side (16 -> 256 tokens)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side (best is kept)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--fused", action="store_true", help="fused AdamW for both sides")
    p.add_argument("--llamagen", metavar="PATH", help="a LlamaGen checkout to compare against")
    p.add_argument("--components", action="store_true", help="time each part of a step")
    p.add_argument("--ops", type=int, default=0, metavar="N", help="profiler's top N operators")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.batch < 1:
        p.error("--repeats and --batch must be >= 1")
    torch.set_num_threads(a.threads)

    with seeded(0):
        net = build_vistok(a).train()
        codes = torch.randint(a.vocab, (a.batch, a.side, a.side))
        labels = torch.randint(a.classes, (a.batch,))
    count = sum(p.numel() for p in net.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; "
        f"GPT depth {net.depth} dim {net.dim} heads {net.heads}, {count / 1e6:.1f}M parameters; "
        f"batch {a.batch} x {net.num_tokens} tokens, vocab {a.vocab}, AdamW fused={a.fused}"
    )
    steps = {"vistok": make_step(net, lambda: net.loss(codes, labels)[0], a.fused)}
    parts = {"vistok": vistok_parts(net, codes, labels)}
    lg = ref = None
    if a.llamagen:
        lg = import_llamagen(a.llamagen)
        with seeded(0):
            ref = build_llamagen(lg, net, a)
        ref_count = sum(p.numel() for p in ref.parameters())
        if ref_count != count:
            sys.exit(f"error: LlamaGen's model has {ref_count} parameters, vistok's {count}")
        diff = same_function(net, ref, codes, labels)
        print(f"LlamaGen {ref_count / 1e6:.1f}M parameters, same weights: |logit diff| {diff:.1e}")
        if diff > 1e-3:
            sys.exit("error: the two models compute different functions; the comparison is void")
        steps["LlamaGen"] = make_step(ref, llamagen_loss(ref, codes, labels), a.fused)
        parts["LlamaGen"] = llamagen_parts(lg, ref, codes, labels)

    with seeded(1):
        times = interleaved(steps, a.repeats)
    print(f"\ntraining step, s (interleaved, {a.repeats} each)")
    for name, ts in times.items():
        print(f"{name:<10} best {min(ts):.3f}   all " + " ".join(f"{t:.3f}" for t in ts))
    if ref is not None:
        ratio = min(times["vistok"]) / min(times["LlamaGen"])
        print(f"vistok / LlamaGen (best): {ratio:.3f}   (< 1: vistok's step is faster)")

    if a.components:
        with seeded(2):
            models = {"vistok": net, "LlamaGen": ref}
            opts = {s: optimizer_part(models[s], a.fused) for s in parts}
            components(parts, opts, a)
    if a.ops:
        for name, step in steps.items():
            print(f"\n{name}: top {a.ops} operators of one step (self CPU time)")
            print(top_ops(step, a.ops))


if __name__ == "__main__":
    main()
