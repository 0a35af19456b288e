"""The GPT's hot paths compute the reference functions: the cross-entropy over flat rows, the
rotary embedding, and attention that stays on SDPA's fused kernels (the causal flag in training,
a lower-right causal bias, never a materialised mask, when several tokens are decoded at once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from vistok.generators import layers
from vistok.generators.ar import GPT, token_loss
from vistok.generators.layers import apply_rope, rope_angles, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")

SPACES = {
    "index": {"kind": "index", "vocab_size": 32, "channels": 4},
    "groups": {"kind": "groups", "groups": 2, "vocab_size": 16, "channels": 8},
    "bits": {"kind": "bits", "bits": 6, "channels": 6},
}


@pytest.mark.parametrize("shape", [(2, 5, 1, 7), (3, 4, 4, 16), (2, 6, 8, 2)])
def test_token_loss_is_the_mean_negative_log_likelihood(shape):
    b, n, f, v = shape
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=g)).requires_grad_()
    seq = torch.randint(v, (b, n, f), generator=g)
    loss, stats = token_loss(logits, seq)
    loss.backward()

    # Brute force in float64: log p = l - log sum exp l, per entry.
    ld = logits.detach().double()
    logp = ld - ld.exp().sum(-1, keepdim=True).log()  # (B, N, F, V)
    nll = -logp.gather(-1, seq[..., None])[..., 0]  # (B, N, F)
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-6)
    assert stats["nll_per_token"].item() == pytest.approx(nll.sum(-1).mean().item(), rel=1e-6)
    hits = [ld[i, j, k].argmax().item() == seq[i, j, k].item() for i in range(b)
            for j in range(n) for k in range(f)]  # fmt: skip
    assert stats["accuracy"].item() == pytest.approx(sum(hits) / len(hits))
    # d mean(nll) / d logits = (softmax - one_hot) / entries
    expected = (logp.exp() - F.one_hot(seq, v).double()) / (b * n * f)
    assert torch.allclose(logits.grad.double(), expected, atol=1e-7)


@pytest.mark.parametrize("token_shape", [(4, 6), (10,)])
def test_rope_rotates_each_pair_by_its_angle(token_shape):
    """Pair (x[2i], x[2i+1]) of a head is the complex number x[2i] + i x[2i+1], multiplied by
    exp(i angle); checked on a strided view like the one attention passes in."""
    heads, head_dim = 3, 8
    t = 1 + torch.Size(token_shape).numel()
    angles = rope_angles(token_shape, head_dim)  # (T, Dh/2)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, t, 3 * heads * head_dim, generator=g)
    q = qkv.view(2, t, 3, heads, head_dim)[:, :, 0].transpose(1, 2)  # (B, H, T, Dh), strided
    out = apply_rope(q, *rope_tables(angles))

    pairs = q.double().reshape(2, heads, t, head_dim // 2, 2)
    z = torch.complex(pairs[..., 0], pairs[..., 1]) * torch.polar(
        torch.ones_like(angles.double()), angles.double()
    )
    expected = torch.stack([z.real, z.imag], -1).reshape(2, heads, t, head_dim)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.equal(out[:, :, 0], q[:, :, 0])  # the class token's angle is 0


def test_rope_backward_is_the_inverse_rotation():
    """The rotation is orthogonal: its gradient rotates the incoming gradient back."""
    angles = rope_angles((3, 3), 8)
    x = torch.randn(2, 2, 10, 8, requires_grad=True)
    grad = torch.randn(2, 2, 10, 8)
    apply_rope(x, *rope_tables(angles)).backward(grad)
    back = apply_rope(grad, *rope_tables(-angles))
    assert torch.allclose(x.grad, back, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_attention_never_builds_a_mask(kind, monkeypatch):
    """Training: every SDPA call (trunk and factorized head) has the causal flag and no mask.
    Decoding several tokens through the cache (speculative verification): a CausalBias, and the
    same hidden states as the cache-free pass."""
    calls = []

    class Recording:
        """torch.nn.functional as the attention layers see it, SDPA calls recorded. (Patching
        torch's own attribute would hide SDPA from CausalBias, which dispatches on it.)"""

        def __getattr__(self, name):
            return getattr(F, name)

        def scaled_dot_product_attention(self, q, k, v, attn_mask=None, is_causal=False, **kw):
            calls.append((q.shape[2], attn_mask, is_causal))
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw
            )

    monkeypatch.setattr(layers, "F", Recording())
    torch.manual_seed(0)
    model = GPT(SPACES[kind], [3, 3], 5, preset="tiny").train()
    codes = torch.randint(2, (2, 3, 3, *([] if kind == "index" else [model.factors])))
    model.loss(codes, torch.tensor([1, -1]))[0].backward()
    assert calls and all(mask is None and causal for _, mask, causal in calls)

    model.eval()
    calls.clear()
    x = torch.randn(2, 9, model.dim)
    with torch.no_grad():
        full = model.hidden(x)
        model.setup_cache(2)
        parts = [model.hidden(x[:, a:b], start=a) for a, b in ((0, 4), (4, 5), (5, 9))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    for t, mask, causal in calls[len(model.blocks) :]:  # after the cache-free pass
        assert not causal and (mask is None if t == 1 else isinstance(mask, CausalBias))
