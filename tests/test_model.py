import pytest
import torch

import model
from conftest import TINY, randomize_adapters
from tasks import ALL, FASHIONGEN_CLASSES, model_tasks, param_table

TASKS = {"xmr": ("contrastive", "norm"), "tgir": ("fusion", "norm"), "scr": ("fusion", 5), "fic": ("generative", "lm")}


def tokens(texts, length):
    import open_clip
    return open_clip.tokenize(texts, context_length=length)


def test_parity_tiny(tiny_clip):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8).eval()
    images = torch.randn(3, 3, 32, 32)
    text = tokens(["a red dress", "long sleeve shirt in navy. striped pattern.", "bag"], 32)
    with torch.no_grad():
        for task in TASKS:
            assert (m.encode_image(images, task) - tiny_clip.encode_image(images)).abs().max() <= 1e-5
            assert (m.encode_text(text, task) - tiny_clip.encode_text(text)).abs().max() <= 1e-5
        # fresh XAAs add exactly 0: fusion mode equals the sum of the two contrastive features
        fused = m.fuse(images, text, "scr")
        assert torch.allclose(fused, m.encode_image(images, "scr") + m.encode_text(text, "scr"), atol=1e-6)


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    clip = model.build_clip("ViT-B-16-quickgelu", pretrained=None).eval()
    paper = model_tasks(ALL, {t: FASHIONGEN_CLASSES for t in ALL})  # FashionGen's 121 sub-categories
    return clip, model.FAMEViL(clip, paper, bottleneck=64).eval()


def test_parity_vit_b16(vit_b16):
    clip, m = vit_b16
    images, text = torch.randn(2, 3, 224, 224), tokens(["a photo of a dress", "black leather boots"], 77)
    with torch.no_grad():
        assert (m.encode_image(images, "xmr") - clip.encode_image(images)).abs().max() <= 1e-5
        assert (m.encode_text(text, "fic") - clip.encode_text(text)).abs().max() <= 1e-5


def test_sizes_vit_b16(vit_b16):
    t = param_table(vit_b16[1])
    assert t["clip"] == 149_620_737
    assert t["tsa_per_task"] == 2_013_720 and set(t["tsa"].values()) == {2_013_720}
    assert t["xaa"] == 31_219_224 and t["xaa_per_tower"]["text"] == 13_437_708
    assert t["heads"] == {"xmr": 1, "tgir": 1, "scr": 62_073, "fic": 25_346_304}
    assert t["total"] == 214_303_220
    assert t["single_task"] == {"xmr": 151_634_458, "tgir": 182_853_682, "scr": 182_915_754, "fic": 190_418_469}
    assert t["single_task_total"] == 707_822_363


def test_gate_opens_only_when_xaa_nonzero(tiny_clip):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8).eval()
    images, text = torch.randn(2, 3, 32, 32), tokens(["red dress", "blue shirt with dots"], 32)
    with torch.no_grad():
        alone = m.encode_image(images, "scr") + m.encode_text(text, "scr")  # eps = 0: contrastive features
        assert torch.allclose(m.fuse(images, text, "scr"), alone, atol=1e-6)
        m.xaa["vision"][0].mlp.up.weight.normal_(0, 0.05)  # one XAA's up-projection becomes non-zero
        assert (m.fuse(images, text, "scr") - alone).abs().max().item() > 1e-3


def test_loss_on_a_task_reaches_only_its_tsa(tiny_clip):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8)
    randomize_adapters(m)
    images, text = torch.randn(2, 3, 32, 32), tokens(["red dress", "blue shirt"], 32)
    m.heads["scr"](m.fuse(images, text, "scr")).sum().backward()
    for name, p in m.named_parameters():
        if name.startswith("tsa."):
            owner = name.split(".")[2]
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (owner == "scr"), name
        if name.startswith("heads."):
            assert (p.grad is not None) == name.startswith("heads.scr."), name


def test_padding_does_not_change_fused_image_feature(tiny_clip):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8).eval()
    randomize_adapters(m, std=0.2)
    images, text = torch.randn(2, 3, 32, 32), tokens(["red dress", "blue shirt with dots"], 32)
    noisy = text.clone()
    noisy[text == 0] = 1234  # garbage after EOT
    pooled = []  # the fused image feature: the vision tower's class token after ln_post and proj
    hook = m.clip.visual.ln_post.register_forward_hook(lambda mod, i, o: pooled.append(o))
    with torch.no_grad():
        fused, fused_noisy = m.fuse(images, text, "scr"), m.fuse(images, noisy, "scr")
    hook.remove()
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6)
    assert torch.allclose(fused, fused_noisy, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_matches_recompute(tiny_clip, beam):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8).eval()
    randomize_adapters(m, std=0.2)
    with torch.no_grad():
        m.heads["fic"].bias[49407] = -1e4  # random weights: never stop early, so we compare >= 20 steps
    images = torch.randn(2, 3, 32, 32)
    cached = m.generate(images, "fic", max_len=25, beam_size=beam)
    full = m.generate(images, "fic", max_len=25, beam_size=beam, use_cache=False)
    assert cached.shape == (2, 26) and torch.equal(cached, full)
    assert (cached[:, 0] == 49406).all()


def test_generate_stops_at_eot(tiny_clip):
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8).eval()
    with torch.no_grad():
        m.heads["fic"].bias[49407] = 1e4  # EOT always wins
    assert m.generate(torch.randn(3, 3, 32, 32), "fic", max_len=20).tolist() == [[49406, 49407]] * 3


def test_clear_errors(tiny_clip):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'"):
        model.build_clip("ViT-B-61")
    with pytest.raises(ValueError, match="equal depth.*vision 3 and text 2"):
        model.FAMEViL(model.build_clip(config={**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 3}}), TASKS)
    m = model.FAMEViL(tiny_clip, TASKS, bottleneck=8)
    with pytest.raises(ValueError, match="unknown task 'xrm'"):
        m.encode_image(torch.randn(1, 3, 32, 32), "xrm")
    with pytest.raises(ValueError, match="mode must be one of"):
        model.FAMEViL(tiny_clip, {"xmr": ("contrast", "norm")})
    with pytest.raises(ValueError, match="'fic' is generative: its captioner reads the image only through the "
                                         "text-side XAA"):
        model.FAMEViL(tiny_clip, TASKS, xaa=False)


def test_params_cli_json():
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tasks.py"), "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t = json.loads(out.stdout)  # one JSON object, nothing else on stdout; built without downloading weights
    assert (t["clip"], t["tsa_per_task"], t["xaa"], t["total"]) == (149_620_737, 2_013_720, 31_219_224, 214_303_220)
    assert round(100 * t["saving"], 2) == 69.72


def test_image_size_from_config_or_name():
    assert model.image_size("ViT-B-16-quickgelu") == 224 and model.image_size("ViT-L-14-336") == 336
    assert model.image_size("anything", TINY) == 32 and model.image_size("hf-hub:org/unknown") == 224


def test_sot_eot_are_the_tokenizers():  # model.py writes them as numbers; EOT must stay the largest id
    import open_clip
    bpe = open_clip.tokenizer._tokenizer
    assert (model.SOT, model.EOT) == (bpe.sot_token_id, bpe.eot_token_id) == (49406, 49407)
    assert model.EOT == max(bpe.encoder.values())
    ids = tokens(["a red dress", ""], 8)
    assert model.eot_position(ids).tolist() == [4, 1] and model.padding(ids)[1].tolist() == [0, 0] + [1] * 6


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_on_a_batch_equals_each_image_alone(tiny_clip, use_cache):
    # each image's beams read that image's vision memory: batching must not change any caption
    m = model.FAMEViL(tiny_clip, {"xmr": TASKS["xmr"], "fic": TASKS["fic"]}, bottleneck=8).eval()
    randomize_adapters(m, std=0.2)
    with torch.no_grad():
        m.heads["fic"].bias[model.EOT] = -1e4  # never stop early: every caption has max_len tokens
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    together = m.generate(images, "fic", max_len=10, beam_size=3, use_cache=use_cache)
    alone = torch.cat([m.generate(images[j:j + 1], "fic", max_len=10, beam_size=3, use_cache=use_cache)
                       for j in range(3)])
    assert torch.equal(together, alone)
