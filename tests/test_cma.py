"""CMA-CLIP: modality-wise attention, the multi-attribute head, Algorithm 1's stages, modality fusion."""
import pytest
import torch
import torch.nn.functional as F

import model
import train
from adapters import ModalityAttention
from tasks import TASKS, model_tasks


def test_lambda_is_a_per_sample_softmax_and_w_learns():
    att = ModalityAttention(8)
    with torch.no_grad():
        att.w.normal_()
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    c, lam = att(image, text)
    e = torch.stack([image @ att.w, text @ att.w], 1).softmax(1)  # CMA-CLIP Eq. (4-6) written out
    assert torch.allclose(lam, e[:, 0], atol=1e-6) and torch.allclose(1 - lam, e[:, 1], atol=1e-6)
    assert torch.allclose(c, lam[:, None] * image + (1 - lam[:, None]) * text)  # Eq. (3)
    c.sum().backward()
    assert att.w.grad is not None and att.w.grad.abs().sum() > 0


@pytest.mark.parametrize("clean", ["image", "text"])
def test_lambda_moves_to_the_clean_modality(clean):
    # one modality carries the class, the other is pure noise: lambda (the image weight) should learn to
    # favour the clean one. It starts at 0.5.
    torch.manual_seed(0)
    att, head = ModalityAttention(16), torch.nn.Linear(16, 4)
    opt = torch.optim.Adam([*att.parameters(), *head.parameters()], lr=3e-2)
    means = torch.randn(4, 16) * 2

    def pair(n):
        y = torch.randint(0, 4, (n,))
        signal, noise = means[y] + 0.3 * torch.randn(n, 16), 2 * torch.randn(n, 16)
        return (signal, noise) if clean == "image" else (noise, signal), y

    for _ in range(300):
        (image, text), y = pair(64)
        loss = F.cross_entropy(head(att(image, text)[0]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lam = att(*pair(512)[0])[1].mean().item()
    assert lam > 0.6 if clean == "image" else lam < 0.4


CLASSES = {"category": 3, "subcategory": 5, "colour": 4}


@pytest.fixture
def cma_model(tiny_clip):  # train.py's defaults: TSA on, so the stages must freeze the adapters too
    return model.FAMEViL(tiny_clip, model_tasks(["cma"], {"cma": CLASSES}, (1, 2)), bottleneck=8)


def test_cma_head_logits_per_attribute(cma_model):
    import open_clip
    batch = {"image": torch.randn(3, 3, 32, 32), "text": open_clip.tokenize(["red", "a blue dress", "x"], context_length=32),
             "attrs": torch.tensor([[0, 1, 2], [2, 4, -1], [1, 0, 3]])}
    logits = TASKS["cma"].logits(cma_model, batch, "cma")
    assert [tuple(l.shape) for l in logits] == [(3, 3), (3, 5), (3, 4)]
    expected = sum(F.cross_entropy(l, batch["attrs"][:, i], ignore_index=-1) for i, l in enumerate(logits))
    assert TASKS["cma"].loss(logits, batch).item() == pytest.approx(expected.item())  # Algorithm 1, line 14
    noisy = dict(batch, text=batch["text"].clone())
    noisy["text"][batch["text"] == 0] = 77  # padding is masked in the sequence-wise attention
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, TASKS["cma"].logits(cma_model, noisy, "cma")))


def test_stages_train_what_algorithm_1_trains(cma_model):
    # each stage's trainable parameters, by name, against the modules Algorithm 1 names
    def trained(stage):
        cfg, _, _ = train.parse_config(["--task", "cma", "--cma_stage", stage])
        return {n for g in train.param_groups(cma_model, cfg) for p in g["params"]
                for n, q in cma_model.named_parameters() if q is p}

    names = {n for n, _ in cma_model.named_parameters()}
    assert any(n.startswith("tsa.") for n in names)  # the adapters exist, inside the "frozen" encoders
    modality = {n for n in names if n.startswith(("heads.cma.modality.", "heads.cma.mlp."))}
    sequence = {n for n in names if n.startswith("heads.cma.sequence.")}
    assert modality and sequence
    assert trained("warmup") == sequence | modality  # lines 3-4: CLIP and every adapter frozen
    assert trained("end2end") == names  # line 17: everything
    assert trained("tune") == modality  # lines 22-23: only the modality-wise attentions and MLPs
    cfg, given, _ = train.parse_config(["--cma_stage", "warmup"])
    assert (cfg["lr"], cfg["backbone_lr"]) == (1e-5, 1e-5)  # lines 4, 18, 23: 1e-5 for every trained module
    cfg, _, _ = train.parse_config(["--cma_stage", "tune", "--lr", "3e-4"])
    assert (cfg["lr"], cfg["backbone_lr"]) == (3e-4, 1e-5)  # the command line wins


def test_modality_fusion_weighs_the_pooled_features(tiny_clip):
    import open_clip
    m = model.FAMEViL(tiny_clip, model_tasks(["scr", "tgir"], {"scr": {"class": 5}}), bottleneck=8,
                      fusion="modality").eval()
    assert set(m.fusers) == {"scr", "tgir"}  # one w per fusion task
    images, text = torch.randn(2, 3, 32, 32), open_clip.tokenize(["red dress", "shoes"], context_length=32)
    seen = []  # the pooled image and text features the fuser weighs
    m.fusers["scr"].register_forward_hook(lambda mod, inputs, o: seen.append(inputs))
    with torch.no_grad():
        m.fusers["scr"].w.normal_()
        fused = m.fuse(images, text, "scr")
    i, t = seen[0]
    lam = torch.sigmoid((i - t) @ m.fusers["scr"].w)[:, None]
    assert torch.allclose(fused, lam * i + (1 - lam) * t, atol=1e-6)
    assert not torch.allclose(fused, i + t, atol=1e-3)  # not the paper's plain sum

