"""The initial state of a fresh FAMEViL, component by component, by value.

Fresh adapters add exactly zero, so a fresh model computes exactly what open_clip computes (bit for bit: every
comparison below is torch.equal, no tolerance); every head and CMA-CLIP's parts start as PyTorch's defaults.
PyTorch's defaults, as its documentation gives them: nn.Linear weight and bias ~ U(-1/sqrt(in), 1/sqrt(in));
nn.LayerNorm weight 1, bias 0; nn.MultiheadAttention in_proj_weight xavier-uniform U(-sqrt(6 / (in + out)), ..),
in_proj_bias and out_proj.bias 0, out_proj.weight an nn.Linear's.
"""
import math

import open_clip
import pytest
import torch
import torch.nn as nn

import adapters
import model
from conftest import TINY

CMA_CLASSES = {"category": 3, "subcategory": 5}
TASKS = {"xmr": ("contrastive", "norm"), "tgir": ("fusion", "norm"), "scr": ("fusion", 5), "fic": ("generative", "lm"),
         "cma": ("contrastive", ("cma", CMA_CLASSES, 2, 2))}  # 2 sequence-wise layers: their init can be compared
CAPTIONS = ["a red dress", "long sleeve shirt in navy. striped pattern.", "bag"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: a tiny model runs fastest on one thread
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return model.build_clip(config=TINY).eval()


@pytest.fixture(scope="module", params=["add", "modality"])
def m(request, clip):
    torch.manual_seed(1)
    return model.FAMEViL(clip, TASKS, bottleneck=8, fusion=request.param).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)  # (3, 3, 32, 32)
    return images, open_clip.tokenize(CAPTIONS, context_length=32)  # (3, 32)


def every_tsa(m):  # [(name, AdaptMLP, width)]: one per tower, task and layer
    return [(f"tsa.{tw}.{t}.{i}", a, a.ln.normalized_shape[0])
            for tw in m.tsa for t in m.tsa[tw] for i, a in enumerate(m.tsa[tw][t])]


def every_xaa(m):  # [(name, CrossAttentionAdapter, its width, the other tower's width)]
    return [(f"xaa.{tw}.{i}", x, x.q.in_features, x.k.in_features) for tw in m.xaa for i, x in enumerate(m.xaa[tw])]


def assert_linear_default(lin, name):
    """nn.Linear's reset_parameters: weight and bias ~ U(-b, b), b = 1/sqrt(in_features): inside the bound, not
    zero, and (for >= 100 entries) spread over it like a uniform: max |w| > 0.9 b, mean |w| = b/2 within 0.1 b."""
    b = 1 / math.sqrt(lin.in_features)
    for kind, p in (("weight", lin.weight), ("bias", lin.bias)):
        p = p.detach()
        assert p.abs().max() <= b and p.abs().max() > 0, (name, kind)
        if p.numel() >= 100:
            assert p.abs().max() > 0.9 * b and abs(p.abs().mean() - b / 2) < 0.1 * b, (name, kind)


def assert_layernorm_default(ln, name):
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias)), name


# ----------------------------------------------------------------------------- adapters add exactly zero
def test_every_tsa_outputs_exactly_zero(m):
    g = torch.Generator().manual_seed(2)
    tsas = every_tsa(m)
    assert len(tsas) == 2 * len(TASKS) * m.depth  # both towers, every task, every layer
    for name, tsa, width in tsas + [("standalone", adapters.AdaptMLP(24, 4), 24)]:
        x = 3 * torch.randn(2, 7, width, generator=g)  # (B, N, width)
        assert torch.equal(tsa(x), torch.zeros_like(x)), name


def test_every_xaa_outputs_exactly_zero_with_and_without_padding(m):
    g = torch.Generator().manual_seed(3)
    xaas = every_xaa(m)
    assert sorted({n.split(".")[1] for n, *_ in xaas}) == ["text", "vision"] and len(xaas) == 2 * m.depth
    pad = torch.tensor([[False] * 5 + [True] * 4, [False] * 9])  # (B, M): True = padding (never a whole row)
    for name, xaa, width, other in xaas:
        x, y = torch.randn(2, 6, width, generator=g), torch.randn(2, 9, other, generator=g)  # (B, N, w), (B, M, w')
        for out in (xaa(x, y), xaa(x, y, pad), xaa(x, xaa.keys_values(y), pad)):  # (B, N, width)
            assert torch.equal(out, torch.zeros_like(x)), name


# ----------------------------------------------------------------------------- so a fresh model is open_clip
@pytest.mark.parametrize("task", list(TASKS))
def test_fresh_encoders_equal_open_clip_exactly(m, clip, inputs, task):
    # with every task's TSA: bit-for-bit equal (h + MLP + 0 is h + MLP exactly), not merely close
    images, tokens = inputs
    with torch.no_grad():
        assert torch.equal(m.encode_image(images, task), clip.encode_image(images))  # (3, E)
        assert torch.equal(m.encode_text(tokens, task), clip.encode_text(tokens))  # (3, E)


@pytest.mark.parametrize("task", ["scr", "tgir"])
def test_fresh_fusion_is_the_contrastive_sum_or_mean(m, inputs, task):
    # fusion mode with fresh XAAs = each tower alone; fusion="add" sums the two features, "modality" weighs
    # them 1/2 and 1/2 (lambda = 0.5): exactly the mean
    images, tokens = inputs
    with torch.no_grad():
        pair = m.encode_image(images, task) + m.encode_text(tokens, task)  # (3, E)
        fused = m.fuse(images, tokens, task)  # (3, E)
    assert torch.equal(fused, pair if m.fusion == "add" else pair / 2)
    assert (task in m.fusers) == (m.fusion == "modality")


def test_fresh_decoder_states_are_the_contrastive_text_states(m, inputs):
    # generative mode's eps = 1, but a fresh text-side XAA adds 0: teacher forcing = the text tower alone
    images, tokens = inputs
    with torch.no_grad():
        decoder = m.caption_states(images, tokens, "fic")  # (3, L, Dt)
        alone = m.text.ln_final(m("fic", "contrastive", tokens=tokens)[1])  # (3, L, Dt)
        assert torch.equal(decoder, alone)


# ----------------------------------------------------------------------------- heads and CMA-CLIP's parts
def test_modality_attention_starts_at_one_half_and_the_mean():
    g = torch.Generator().manual_seed(4)
    att = adapters.ModalityAttention(16)
    assert torch.equal(att.w, torch.zeros(16))
    image, text = 5 * torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)  # (B, D) each, far apart
    c, lam = att(image, text)  # (B, D), (B,)
    assert torch.equal(lam, torch.full((8,), 0.5)) and torch.equal(c, (image + text) / 2)


def test_every_modality_attention_in_the_model_starts_at_zero(m):
    found = {n for n, mod in m.named_modules() if isinstance(mod, adapters.ModalityAttention)}
    expected = {f"heads.cma.modality.{a}" for a in CMA_CLASSES}
    assert found == expected | ({"fusers.tgir", "fusers.scr"} if m.fusion == "modality" else set())
    for n in found:
        assert torch.equal(m.get_submodule(n).w, torch.zeros(32)), n


@pytest.mark.parametrize("task", ["xmr", "tgir"])
def test_retrieval_heads_start_at_scale_4_so_logits_are_16_cos(m, task):
    head = m.heads[task]
    assert isinstance(head, model.ScaledNorm) and head.scale.item() == 4.0 and head.scale.ndim == 0
    g = torch.Generator().manual_seed(5)
    a, b = 3 * torch.randn(4, 32, generator=g), torch.randn(5, 32, generator=g)  # (4, E), (5, E)
    with torch.no_grad():
        logits = head(a) @ head(b).T  # (4, 5)
    cos = nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)  # (4, 5)
    assert torch.allclose(logits, 16 * cos, rtol=1e-6, atol=1e-5)


def test_adapters_start_as_documented_and_pytorch_defaults(m):
    for name, tsa, width in every_tsa(m) + [(n + ".mlp", x.mlp, w) for n, x, w, _ in every_xaa(m)]:
        assert torch.equal(tsa.up.weight, torch.zeros(width, 8)) and torch.equal(tsa.up.bias, torch.zeros(width)), name
        assert tsa.scale.ndim == 0 and tsa.scale.item() == 1.0, name
        assert_linear_default(tsa.down, name + ".down")
        assert_layernorm_default(tsa.ln, name + ".ln")
    for name, xaa, width, other in every_xaa(m):
        assert (xaa.q.in_features, xaa.k.in_features, xaa.v.in_features) == (width, other, other), name
        for lin in ("q", "k", "v"):
            assert_linear_default(getattr(xaa, lin), f"{name}.{lin}")
        assert_layernorm_default(xaa.ln_q, name + ".ln_q")
        assert_layernorm_default(xaa.ln_kv, name + ".ln_kv")


def test_linear_heads_keep_pytorch_defaults(m):
    assert_linear_default(m.heads["scr"], "heads.scr")
    assert_linear_default(m.heads["fic"], "heads.fic")  # untied from the token embedding
    assert not torch.equal(m.heads["fic"].weight, m.clip.token_embedding.weight)
    for a, n in CMA_CLASSES.items():
        first, _, last = m.heads["cma"].mlp[a]
        assert (first.out_features, last.out_features) == (32, n)
        assert_linear_default(first, f"cma.mlp.{a}.0")
        assert_linear_default(last, f"cma.mlp.{a}.2")


def test_cma_sequence_transformer_starts_as_pytorch_defaults(m):
    layers = m.heads["cma"].sequence.layers
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        attn, E = layer.self_attn, 32
        bound = math.sqrt(6 / (E + 3 * E))  # xavier-uniform of the packed (3E, E) q/k/v projection
        assert attn.in_proj_weight.abs().max() <= bound and attn.in_proj_weight.abs().max() > 0.9 * bound, i
        assert torch.equal(attn.in_proj_bias, torch.zeros(3 * E)) and torch.equal(attn.out_proj.bias, torch.zeros(E))
        assert attn.out_proj.weight.abs().max() <= 1 / math.sqrt(E) and attn.out_proj.weight.abs().max() > 0
        assert_linear_default(layer.linear1, f"layer {i} linear1")
        assert_linear_default(layer.linear2, f"layer {i} linear2")
        assert_layernorm_default(layer.norm1, f"layer {i} norm1")
        assert_layernorm_default(layer.norm2, f"layer {i} norm2")
    # nn.TransformerEncoder deep-copies its one layer (pytorch/pytorch#86274): the layers start IDENTICAL
    for (n0, p0), (n1, p1) in zip(layers[0].named_parameters(), layers[1].named_parameters()):
        assert n0 == n1 and torch.equal(p0, p1), n0
