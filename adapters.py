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

    The up-projection starts at zero, so a fresh adapter adds exactly 0 and the adapted model
    starts as the pretrained CLIP (our parity test relies on this). s is a learnable scalar (init 1).
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
    """

    def __init__(self, width, context_width, heads, bottleneck):
        super().__init__()
        self.heads = heads
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(context_width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(context_width, width)
        self.v = nn.Linear(context_width, width)
        self.mlp = AdaptMLP(width, bottleneck)

    def _split(self, x):  # (B, N, width) -> (B, heads, N, width/heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, y):  # y (B, M, context_width) -> k, v (B, heads, M, width/heads)
        y = self.ln_kv(y)
        return self._split(self.k(y)), self._split(self.v(y))

    def _queries_and_mask(self, x, pad):
        q = self._split(self.q(self.ln_q(x)))  # (B, heads, N, hd)
        keep = None if pad is None else ~pad[:, None, None, :]  # (B, 1, 1, M), True = attend
        return q, keep

    def forward(self, x, kv, pad=None):  # x (B, N, width), kv from keys_values, pad (B, M) True = padding
        q, keep = self._queries_and_mask(x, pad)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=keep)  # (B, heads, N, hd)
        return self.mlp(out.transpose(1, 2).flatten(2))  # (B, N, width)

    def attention_map(self, x, kv, pad=None):  # -> (B, N, M) attention weights averaged over heads
        q, keep = self._queries_and_mask(x, pad)
        logits = q @ kv[0].transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, heads, N, M)
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
