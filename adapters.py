"""
The small modules FAME-ViL adds to CLIP, and CMA-CLIP's modality-wise attention.

    TSA  = AdaptMLP                       Eq. (4)   one per task, per layer, per tower
    XAA  = CrossAttentionAdapter          Eq. (5)   one per layer per tower, shared by all tasks
    CMA  = ModalityAttention              CMA-CLIP Eq. (3-6), keyless: which modality to trust

Nothing in this file knows about tasks, data or open_clip.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class AdaptMLP(nn.Module):
    """Scaled parallel adapter, Eq. (4): s * up(ReLU(down(LN(x)))).

    At init: the up-projection's weight and bias are zero, so a fresh adapter adds exactly 0 and the adapted
    model computes exactly the pretrained CLIP, bit for bit; s is a learnable scalar (init 1); the LayerNorm
    (1, 0) and the down-projection keep PyTorch's defaults.
    """

    def __init__(self, width, bottleneck):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):  # (B, N, width) -> (B, N, width)
        return self.scale * self.up(F.relu(self.down(self.ln(x))))


class CrossAttentionAdapter(nn.Module):
    """Eq. (5): z_xaa = s * AdaptMLP(LN(MHXA(z', y))).

    Queries come from this stream's post-attention state z' (its own LN), keys and values from the
    other stream's state y (another LN). Q, K and V map to *this* stream's width with this stream's
    head count, and there is no output projection: the AdaptMLP that follows plays that role.
    Keys/values are a separate method so that caption decoding computes them once per image.
    At init Q, K, V and both LayerNorms keep PyTorch's defaults and the AdaptMLP is a fresh one: a fresh XAA
    adds exactly 0, whatever it reads.
    """

    def __init__(self, width, context_width, heads, bottleneck):
        super().__init__()
        self.heads = heads
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(context_width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(context_width, width)
        self.v = nn.Linear(context_width, width)
        self.mlp = AdaptMLP(width, bottleneck)

    def _split(self, x):  # (B, N, width) -> (B, heads, N, width / heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, y):  # y (B, M, context_width) -> k, v (B, heads, M, width / heads)
        y = self.ln_kv(y)
        return self._split(self.k(y)), self._split(self.v(y))

    def _attention_inputs(self, x, y, pad):  # -> q, (k, v), mask (B, 1, 1, M) True = attend, or None
        kv = y if isinstance(y, tuple) else self.keys_values(y)
        q = self._split(self.q(self.ln_q(x)))  # (B, heads, N, width / heads)
        keep = None if pad is None else ~pad[:, None, None, :]
        return q, kv, keep

    def forward(self, x, y, pad=None):
        """x (B, N, width) reads y: the other stream's state (B, M, context_width), or its keys/values
        from keys_values(y) (decoding computes them once per image). pad (B, M): True = padding."""
        q, (k, v), keep = self._attention_inputs(x, y, pad)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, N, width / heads)
        return self.mlp(out.transpose(1, 2).flatten(2))  # (B, N, width)

    def attention_map(self, x, y, pad=None):  # -> (B, N, M): the weights forward applies, mean over heads
        q, (k, _), keep = self._attention_inputs(x, y, pad)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, heads, N, M)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(-1).mean(1)


class ModalityAttention(nn.Module):
    """CMA-CLIP's keyless modality-wise attention (its Eq. 3-6), one per task.

        e_I = w.I,  e_T = w.T,  lam = exp(e_I) / (exp(e_I) + exp(e_T)),  c = lam I + (1 - lam) T

    A two-way softmax is the sigmoid of the difference of its logits. w starts at zero, so lam = 0.5
    and c starts as the mean of the two features (FAME-ViL's plain sum, halved).
    """

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, image, text):  # (B, D), (B, D) -> c (B, D), lam (B,)
        lam = torch.sigmoid((image - text) @ self.w)
        return lam[:, None] * image + (1 - lam[:, None]) * text, lam
