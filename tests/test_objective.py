"""The training objective and every mode's dataflow, pinned BY VALUE (not "it runs", not "loss falls").

An independent reference forward (a plain loop over open_clip's blocks, Eq. 2 and 6) is compared with
the model's public API in each mode; hooks record which tensor every XAA reads; decoding is compared
with teacher forcing; each task's logits and loss are written out by hand. Adapters get random
non-zero up-projections: fresh ones add exactly 0 and would hide most dataflow bugs.
Only public API is used, so these tests must survive a refactor of model.py / tasks.py / train.py.
"""
import copy

import open_clip
import pytest
import torch

import adapters
import distill
import model
import train
from conftest import TINY, randomize_adapters
from tasks import TASKS

LABEL_KEY = "class"  # SCR's label key in a batch: the label of the data's class attribute
SOT, EOT = 49406, 49407  # CLIP's start / end of text; EOT is the largest id, padding is 0
EPS = {"contrastive": (0, 0), "fusion": (1, 1), "generative": (0, 1)}  # (vision<-text, text<-vision)
CMA_CLASSES = {"category": 3, "subcategory": 5}
MODEL_TASKS = {"xmr": ("contrastive", "norm"), "tgir": ("fusion", "norm"), "scr": ("fusion", 5),
               "fic": ("generative", "lm"), "cma": ("contrastive", ("cma", CMA_CLASSES, 1, 2))}
TOL = 1e-5  # float noise of two orderings of the same computation
MARGIN = 1e-2  # a wrong dataflow must move outputs by at least this (asserted where it matters)
CAPTIONS = ["red dress with white dots", "navy shirt", "black leather ankle boots with a zip", "a bag"]


def make_batch(B=4, L=16, seed=0, labels=None):
    """The one batch builder: distinct random images per key, captions of different lengths (padded)."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.arange(B) % 5 if labels is None else labels
    return {"image": img(), "ref": img(), "target": img(),
            "text": open_clip.tokenize((CAPTIONS * B)[:B], context_length=L), LABEL_KEY: labels,
            "attrs": torch.stack([torch.arange(B) % 3, (torch.arange(B) + 2) % 5], 1)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: a tiny model runs fastest on one thread
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    fm = model.FAMEViL(model.build_clip(config=TINY), MODEL_TASKS, bottleneck=8).eval()
    randomize_adapters(fm, std=0.3)  # every TSA and XAA now adds something large and task-specific
    with torch.no_grad():  # scales other than the shared init, so s vs s^2 and xmr vs tgir show
        fm.heads["xmr"].scale.fill_(1.7)
        fm.heads["tgir"].scale.fill_(2.3)
    return fm


# ----------------------------------------------------------------------------- the reference forward
def pad_mask(tokens):  # True after the first EOT (written here, not taken from model.py)
    eot = (tokens == EOT).int().argmax(-1)
    return torch.arange(tokens.shape[1])[None] > eot[:, None]


def reference(m, task, mode, images, tokens, adapt=True):
    """Eq. (2) and (6) for both towers in lock-step, straight from open_clip's block attributes.
    Returns pooled image, pooled text, ln_final'd text states and a per-layer trace of every state.
    (In contrastive mode the towers never meet, so one call gives both encoders' outputs.)"""
    clip, v, (eps_v, eps_t) = m.clip, m.clip.visual, EPS[mode]
    tr = {k: [] for k in ("xv", "hv", "ov", "xt", "ht", "ot")}
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    xv, L = v.ln_pre(v.patch_dropout(x)), tokens.shape[1]
    xt = clip.token_embedding(tokens) + clip.positional_embedding[:L]
    causal, pad = clip.attn_mask[:L, :L], pad_mask(tokens)
    for i, (vb, tb) in enumerate(zip(v.transformer.resblocks, clip.transformer.resblocks)):
        hv = xv + vb.ls_1(vb.attention(q_x=vb.ln_1(xv)))
        ht = xt + tb.ls_1(tb.attention(q_x=tb.ln_1(xt), attn_mask=causal))
        ov = hv + vb.ls_2(vb.mlp(vb.ln_2(hv))) + (m.tsa["vision"][task][i](hv) if adapt else 0)
        if eps_v:  # vision reads the text's h of the same layer, padding masked
            a = m.xaa["vision"][i]
            ov = ov + a(hv, a.keys_values(ht), pad)
        ot = ht + tb.ls_2(tb.mlp(tb.ln_2(ht))) + (m.tsa["text"][task][i](ht) if adapt else 0)
        if eps_t:  # fusion: vision's h of this layer; generative: this vision layer's output
            a = m.xaa["text"][i]
            ot = ot + a(ht, a.keys_values(hv if eps_v else ov))
        for k, val in zip(tr, (xv, hv, ov, xt, ht, ot)):
            tr[k].append(val)
        xv, xt = ov, ot
    states = clip.ln_final(xt)
    pooled_t = states[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection
    return v.ln_post(xv[:, 0]) @ v.proj, pooled_t, states, tr


def caption_logits(m, images, tokens):  # teacher forcing: (B, L, V), position a predicts token a + 1
    return m.heads["fic"](m.caption_states(images, tokens, "fic"))


def close(a, b, tol=TOL):
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def far(a, b, margin=MARGIN):
    return a.shape != b.shape or (a - b).abs().max().item() > margin


@pytest.fixture
def record_kv(monkeypatch):
    """Record the tensor every XAA receives as keys/values: {(tower, layer): [y, ...]}."""
    seen, orig = [], adapters.CrossAttentionAdapter.keys_values

    def spy(self, y):
        seen.append((self, y.detach().clone()))
        return orig(self, y)

    monkeypatch.setattr(adapters.CrossAttentionAdapter, "keys_values", spy)

    def by_layer(m):
        where = {id(x): (tw, i) for tw in m.xaa for i, x in enumerate(m.xaa[tw])}
        out = {}
        for mod, y in seen:
            out.setdefault(where[id(mod)], []).append(y)
        seen.clear()
        return out
    return by_layer


# ----------------------------------------------------------------------------- 1. modes vs the reference
def test_reference_without_adapters_is_open_clip(m):
    # validates the reference's embeddings, masks and pooling against open_clip itself (full context)
    b = make_batch(L=TINY["text_cfg"]["context_length"])
    with torch.no_grad():
        v, t, _, _ = reference(m, "xmr", "contrastive", b["image"], b["text"], adapt=False)
        assert close(v, m.clip.encode_image(b["image"])) and close(t, m.clip.encode_text(b["text"]))


@pytest.mark.parametrize("task", ["xmr", "tgir", "scr", "fic"])
def test_contrastive_encoders_match_reference(m, task):
    b = make_batch()
    with torch.no_grad():
        v, t, _, _ = reference(m, task, "contrastive", b["image"], b["text"])
        assert close(m.encode_image(b["image"], task), v) and close(m.encode_text(b["text"], task), t)
        other = "scr" if task != "scr" else "xmr"  # a task's own TSA matters: another task's gives far values
        ov, ot, _, _ = reference(m, other, "contrastive", b["image"], b["text"])
        assert far(v, ov) and far(t, ot)


def test_fusion_matches_reference_sum_of_pooled(m):
    b = make_batch()
    with torch.no_grad():
        v, t, _, _ = reference(m, "scr", "fusion", b["image"], b["text"])
        fused = m.fuse(b["image"], b["text"], "scr")
        assert close(fused, v + t)  # a plain sum of the two pooled features
        cv, ct, _, _ = reference(m, "scr", "contrastive", b["image"], b["text"])
        assert far(v, cv) and far(t, ct)  # both XAA directions matter by a margin


def test_fusion_xaa_reads_other_towers_h_of_same_layer(m, record_kv):
    b = make_batch()
    with torch.no_grad():
        m.fuse(b["image"], b["text"], "scr")
        seen = record_kv(m)
        _, _, _, tr = reference(m, "scr", "fusion", b["image"], b["text"])
    n = len(tr["hv"])
    assert sorted(seen) == [(tw, i) for tw in ("text", "vision") for i in range(n)]
    for i in range(n):
        # vision XAA at layer i reads text h_i; text XAA reads vision h_i (not x_i, x'_i, nor another layer)
        for tower, other in (("vision", "t"), ("text", "v")):
            want = tr["h" + other][i]
            wrong = tr["x" + other] + tr["o" + other] + tr["h" + other][:i] + tr["h" + other][i + 1:]
            assert all(close(y, want) for y in seen[(tower, i)]), (tower, i)
            assert all(far(want, w) for w in wrong)  # the check above can tell them apart


def test_padding_after_eot_never_reaches_fusion(m):
    b = make_batch()
    noisy = b["text"].clone()
    noisy[pad_mask(noisy)] = 1234  # garbage after EOT
    changed = b["text"].clone()
    changed[0, 1] = 1234  # a real token before EOT
    with torch.no_grad():
        fused = m.fuse(b["image"], b["text"], "scr")
        assert close(m.fuse(b["image"], noisy, "scr"), fused)
        assert far(m.fuse(b["image"], changed, "scr")[0], fused[0])  # real text does reach it


def test_generative_matches_reference(m):
    b = make_batch()
    with torch.no_grad():
        _, _, states, _ = reference(m, "fic", "generative", b["image"], b["text"])
        logits = caption_logits(m, b["image"], b["text"])
        assert close(logits, m.heads["fic"](states))
        _, _, cstates, _ = reference(m, "fic", "contrastive", b["image"], b["text"])
        assert far(logits, m.heads["fic"](cstates))  # the text<-vision XAA matters


def test_generative_text_xaa_reads_vision_layer_output(m, record_kv):
    b = make_batch()
    with torch.no_grad():
        caption_logits(m, b["image"], b["text"])
        seen = record_kv(m)
        _, _, _, tr = reference(m, "fic", "generative", b["image"], b["text"])
    n = len(tr["ov"])
    assert sorted(seen) == [("text", i) for i in range(n)]  # vision never reads text in generative mode
    for i in range(n):
        want, wrong = tr["ov"][i], tr["hv"] + tr["xv"][:i + 1] + tr["ov"][:i] + tr["ov"][i + 1:]
        assert all(close(y, want) for y in seen[("text", i)]), i
        assert all(far(want, w) for w in wrong)


# ----------------------------------------------------------------------------- 2-3. decoding, teacher forcing
def test_greedy_decoding_is_teacher_forcing(m):
    fm = copy.deepcopy(m)
    with torch.no_grad():
        fm.heads["fic"].bias[EOT] = -1e4  # never stop: compare 16 steps
    images = make_batch(B=2)["image"]
    cached = fm.generate(images, max_len=16, beam_size=1, task="fic", use_cache=True)
    full = fm.generate(images, max_len=16, beam_size=1, task="fic", use_cache=False)
    assert cached.shape == (2, 17) and torch.equal(cached, full) and (cached[:, 0] == SOT).all()
    with torch.no_grad():
        logits = caption_logits(fm, images, cached[:, :-1])  # position a predicts token a + 1
    chosen = logits.gather(-1, cached[:, 1:, None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()  # every generated token is the argmax
    assert len(set(cached[0, 1:].tolist())) > 1  # not a degenerate repeat of one token


def test_caption_logits_are_causal(m):
    b = make_batch(B=2)
    tokens, j = b["text"][:, :12].clone(), 5
    other = tokens.clone()
    other[:, j + 1:] = torch.randint(1, 49000, (2, 12 - j - 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = caption_logits(m, b["image"], tokens)
        c = caption_logits(m, b["image"], other)
    assert close(a[:, :j + 1], c[:, :j + 1])  # position <= j never sees a later token
    assert far(a[:, j + 1:], c[:, j + 1:])


def test_fic_loss_is_next_token_ce_up_to_eot(m):
    b = make_batch()
    tokens = b["text"]
    with torch.no_grad():
        full = caption_logits(m, b["image"], tokens)  # (B, L, V): position a predicts a + 1
        loss = TASKS["fic"].loss(TASKS["fic"].logits(m, b, "fic"), b)
    eot = (tokens == EOT).int().argmax(-1)
    terms = [full[r, a].logsumexp(-1) - full[r, a, tokens[r, a + 1]] for r in range(len(tokens))
             for a in range(int(eot[r]))]  # targets tokens 1..EOT, EOT included, padding never
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=TOL)
    no_eot = [full[r, a].logsumexp(-1) - full[r, a, tokens[r, a + 1]] for r in range(len(tokens))
              for a in range(int(eot[r]) - 1)]
    assert abs(torch.stack(no_eot).mean().item() - loss.item()) > 1e-3  # EOT's term is visible


def test_fic_targets_are_never_inputs_and_padding_is_inert(m):
    b = make_batch()
    noisy = dict(b, text=b["text"].clone())
    noisy["text"][pad_mask(b["text"])] = 1234  # garbage after EOT: no input, no target
    last = dict(b, text=b["text"].clone())
    eot = (b["text"] == EOT).int().argmax(-1)
    last["text"][0, eot[0] - 1] = 1234  # the last word before EOT: a target and an input
    with torch.no_grad():
        lg = TASKS["fic"].logits(m, b, "fic")
        loss = TASKS["fic"].loss(lg, b).item()
        noisy_loss = TASKS["fic"].loss(TASKS["fic"].logits(m, noisy, "fic"), noisy).item()
        assert noisy_loss == pytest.approx(loss, abs=TOL)
        # a position never sees the token it predicts: the logits predicting it are unchanged ...
        pos = caption_logits(m, b["image"], b["text"])[0, eot[0] - 2]
        pos2 = caption_logits(m, b["image"], last["text"])[0, eot[0] - 2]
        assert close(pos, pos2)
        # ... yet the loss changes (it is a target)
        assert abs(TASKS["fic"].loss(TASKS["fic"].logits(m, last, "fic"), last).item() - loss) > 1e-3


# ----------------------------------------------------------------------------- 4. task logits
def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_xmr_logits_are_s2_cos_image_to_text_and_transpose(m):
    b = make_batch()
    with torch.no_grad():
        i2t, t2i = TASKS["xmr"].logits(m, b, "xmr")
        s = m.heads["xmr"].scale
        want = s ** 2 * unit(m.encode_image(b["image"], "xmr")) @ unit(m.encode_text(b["text"], "xmr")).T
    assert close(i2t, want) and close(t2i, want.T, 1e-6)  # row = image query, column = text
    assert far(want, want.T) and far(want, want / s)  # direction and s^2 both visible


def test_tgir_logits_are_fused_queries_vs_target_images(m):
    b = make_batch()
    with torch.no_grad():
        (lg,) = TASKS["tgir"].logits(m, b, "tgir")
        s = m.heads["tgir"].scale
        query = unit(m.fuse(b["ref"], b["text"], "tgir"))
        want = s ** 2 * query @ unit(m.encode_image(b["target"], "tgir")).T
        (swapped,) = TASKS["tgir"].logits(m, dict(b, ref=b["target"], target=b["ref"]), "tgir")
        refs = s ** 2 * query @ unit(m.encode_image(b["ref"], "tgir")).T  # gallery = references: wrong
    assert close(lg, want) and far(swapped, lg) and far(refs, want)


def test_scr_logits_are_head_of_fused_feature(m):
    b = make_batch()
    with torch.no_grad():
        (lg,) = TASKS["scr"].logits(m, b, "scr")
        want = m.heads["scr"](m.fuse(b["image"], b["text"], "scr"))
        contrastive = m.heads["scr"](m.encode_image(b["image"], "scr") + m.encode_text(b["text"], "scr"))
    assert close(lg, want) and far(lg, contrastive)


def test_cma_logits_read_image_class_token_and_text_eot(m):
    # CMA-CLIP Sec. 3.2 written out: sequence-wise attention over [image; text] with text padding masked,
    # then per attribute lambda-weighted image [CLS] (position 0) and text EOT (position P + eot)
    fm = copy.deepcopy(m)
    head = fm.heads["cma"]
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in head.modality.parameters():  # w = 0 makes every lambda 0.5; std 0.1 keeps them off 0 and 1
            p.normal_(0, 0.1, generator=g)
    b = make_batch()
    tokens = b["text"]
    seen = {}  # the lambda each modality-wise attention returns: the evaluation reports it as the image's weight
    hooks = [mod.register_forward_hook(lambda mod, inputs, o, a=a: seen.__setitem__(a, o[1]))
             for a, mod in head.modality.items()]
    with torch.no_grad():
        logits = TASKS["cma"].logits(fm, b, "cma")
        image, text = fm.encode_tokens(b["image"], tokens, "cma")
        P, eot = image.shape[1], (tokens == EOT).int().argmax(-1)
        mask = torch.cat([torch.zeros(len(tokens), P, dtype=torch.bool), pad_mask(tokens)], 1)
        x = head.sequence(torch.cat([image, text], 1), src_key_padding_mask=mask)
        i, t = x[:, 0], x[torch.arange(len(tokens)), P + eot]
        for lg, a in zip(logits, CMA_CLASSES):
            lam = torch.sigmoid((i - t) @ head.modality[a].w)[:, None]
            assert close(lg, head.mlp[a](lam * i + (1 - lam) * t)), a
            assert far(lg, head.mlp[a](i)) and far(lg, head.mlp[a](t))  # both modalities matter
            # swapping the attention's arguments gives the same logits (sigmoid(-z) = 1 - sigmoid(z)) and
            # flips only the reported lambda: pin it to the image's weight
            assert (seen[a] - lam[:, 0]).abs().max() < 1e-5, a
            assert (seen[a] - 0.5).abs().max() > 1e-3  # lambda and 1 - lambda differ
    for h in hooks:
        h.remove()


# ----------------------------------------------------------------------------- 5. losses written out
def hand_ce(logits, targets):  # mean over rows with target != -1 of logsumexp(row) - row[target]
    keep = targets != -1
    rows, t = logits[keep], targets[keep]
    return (rows.logsumexp(-1) - rows[torch.arange(len(t)), t]).mean()


def test_xmr_loss_is_mean_of_both_directions(m):
    b = make_batch()
    with torch.no_grad():
        i2t, t2i = TASKS["xmr"].logits(m, b, "xmr")
        loss = TASKS["xmr"].loss((i2t, t2i), b)
    diag = torch.arange(len(i2t))
    a, c = hand_ce(i2t, diag), hand_ce(t2i, diag)
    assert loss.item() == pytest.approx(((a + c) / 2).item(), abs=TOL)
    assert abs(a - c).item() > 1e-3  # one direction alone would be another number


def test_tgir_loss_is_query_to_target_ce(m):
    b = make_batch()
    with torch.no_grad():
        (lg,) = TASKS["tgir"].logits(m, b, "tgir")
        loss = TASKS["tgir"].loss((lg,), b)
    diag = torch.arange(len(lg))
    assert loss.item() == pytest.approx(hand_ce(lg, diag).item(), abs=TOL)
    assert abs(hand_ce(lg.T, diag) - hand_ce(lg, diag)).item() > 1e-3


def test_scr_loss_ignores_unlabelled(m):
    b = make_batch(labels=torch.tensor([1, -1, 4, 0]))
    with torch.no_grad():
        (lg,) = TASKS["scr"].logits(m, b, "scr")
        loss = TASKS["scr"].loss((lg,), b)
    assert loss.item() == pytest.approx(hand_ce(lg, b[LABEL_KEY]).item(), abs=TOL)
    assert abs(hand_ce(lg, b[LABEL_KEY].clamp(min=0)) - loss).item() > 1e-3  # row 1 would count


def test_cma_loss_is_sum_over_attributes_ignoring_unlabelled(m):
    b = make_batch()
    b["attrs"] = torch.tensor([[0, 4], [2, -1], [-1, 1], [1, 3]])
    with torch.no_grad():
        logits = TASKS["cma"].logits(m, b, "cma")
        loss = TASKS["cma"].loss(logits, b)
    assert [lg.shape for lg in logits] == [(4, 3), (4, 5)]  # one tensor per attribute, in attrs order
    terms = [hand_ce(lg, b["attrs"][:, i]) for i, lg in enumerate(logits)]
    assert loss.item() == pytest.approx(sum(terms).item(), abs=TOL)
    assert min(t.item() for t in terms) > 1e-2  # a mean instead of the sum would be another number


def test_xmr_distillation_is_kl_teacher_to_student(m):
    teacher = copy.deepcopy(m)
    with torch.no_grad():  # a teacher that differs in its features and its temperature
        for p in teacher.tsa["vision"]["xmr"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
        teacher.heads["xmr"].scale.fill_(2.5)
    b = make_batch()
    with torch.no_grad():
        student = TASKS["xmr"].logits(m, b, "xmr")
        kd = distill.distill_loss(teacher, "xmr", b, student)
        s = teacher.heads["xmr"].scale  # teacher features on both sides of its similarity matrix
        ti, tt = teacher.encode_image(b["image"], "xmr"), teacher.encode_text(b["text"], "xmr")
        t_i2t = s ** 2 * unit(ti) @ unit(tt).T

    def kl(p_logits, q_logits):  # KL(p || q), summed over classes, mean over rows
        lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    want = (kl(t_i2t, student[0]) + kl(t_i2t.T, student[1])) / 2
    reverse = (kl(student[0], t_i2t) + kl(student[1], t_i2t.T)) / 2
    assert kd.item() == pytest.approx(want.item(), abs=TOL)
    assert abs(reverse - want).item() > 1e-3 and want.item() > 1e-2


# ----------------------------------------------------------------------------- 6. XAA attention map
def test_attention_map_is_the_attention_forward_applies(m, monkeypatch):
    xaa = m.xaa["vision"][0]  # 3 heads: queries from vision (48), keys from text (32)
    g = torch.Generator().manual_seed(4)
    x, y = 3 * torch.randn(2, 5, 48, generator=g), 3 * torch.randn(2, 7, 32, generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True  # row 0: three padded keys
    applied = []

    def manual_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        assert not is_causal and dropout_p == 0
        applied.append(s.softmax(-1))
        return applied[-1] @ v

    with torch.no_grad():
        kv = xaa.keys_values(y)
        real = [xaa(x, kv, pad), xaa(x, kv)]
        maps = [xaa.attention_map(x, kv, pad), xaa.attention_map(x, kv)]
        monkeypatch.setattr(adapters.F, "scaled_dot_product_attention", manual_sdpa)
        manual = [xaa(x, kv, pad), xaa(x, kv)]
    assert len(applied) == 2, "XAA.forward no longer calls F.scaled_dot_product_attention"
    for r, mn, w, amap in zip(real, manual, applied, maps):
        assert close(r, mn)  # the manual attention is what forward computes ...
        assert close(amap, w.mean(1), 1e-6)  # ... and attention_map is its head mean
        assert far(w[:, 0], w.mean(1), 0.05) and far(amap, torch.full_like(amap, 1 / 7), 0.05)
    assert (maps[0][0, :, 4:] == 0).all() and (maps[1][0, :, 4:] > 0).all()
    assert close(maps[0].sum(-1), torch.ones(2, 5), 1e-6)


# ----------------------------------------------------------------------------- 6b. the XAA, Eq. (5), written out
def ln(mod, x):  # a LayerNorm module's computation, by hand
    return torch.nn.functional.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def hand_tsa(a, x):  # Eq. (4): s * up(ReLU(down(LN(x))))
    return a.scale * (torch.relu(ln(a.ln, x) @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)


def hand_xaa(a, x, y, pad=None):  # Eq. (5): AdaptMLP(MHXA(LN_q(x), LN_kv(y))), no output projection
    split = lambda t: t.unflatten(-1, (a.heads, -1)).transpose(1, 2)  # (B, H, N, d)
    y = ln(a.ln_kv, y)
    q, k, v = (split(t) for t in (ln(a.ln_q, x) @ a.q.weight.T + a.q.bias, y @ a.k.weight.T + a.k.bias,
                                  y @ a.v.weight.T + a.v.bias))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    return hand_tsa(a.mlp, (s.softmax(-1) @ v).transpose(1, 2).flatten(2))


def test_xaa_is_eq5_written_out(m):
    # the reference forward calls the XAA modules themselves: only this pins Q, K, V, both LNs and the mask
    for tower, (dx, dy) in (("vision", (48, 32)), ("text", (32, 48))):
        a = m.xaa[tower][1]
        g = torch.Generator().manual_seed(7)
        x, y = 3 * torch.randn(2, 5, dx, generator=g) + 1, 3 * torch.randn(2, 7, dy, generator=g) - 1
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, 3:] = True
        with torch.no_grad():
            for p in (None, pad):
                want = hand_xaa(a, x, y, p)
                assert close(a(x, y, p), want) and close(a(x, a.keys_values(y), p), want), (tower, p)
                assert far(want, hand_xaa(a, x, torch.zeros_like(y), p))  # what is read matters


# ----------------------------------------------------------------------------- 7. CMA-CLIP's modality swap
def test_swap_modality_swaps_a_fraction_never_with_itself():
    b = make_batch(B=4)  # four distinct texts and images: a row changed = a row swapped
    n = text_swaps = image_swaps = 0
    for seed in range(250):
        for step in range(4):
            out = train.swap_modality(b, 0.5, seed, step)
            assert torch.equal(out[LABEL_KEY], b[LABEL_KEY]) and torch.equal(out["attrs"], b["attrs"])
            t = (out["text"] != b["text"]).any(1)
            i = (out["image"] != b["image"]).flatten(1).any(1)
            assert not (t & i).any()  # a sample loses one modality at most
            for r in range(4):  # a swapped row holds another sample's text / image, never noise
                others = [o for o in range(4) if o != r]
                assert not t[r] or any(torch.equal(out["text"][r], b["text"][o]) for o in others)
                assert not i[r] or any(torch.equal(out["image"][r], b["image"][o]) for o in others)
            n, text_swaps, image_swaps = n + 4, text_swaps + int(t.sum()), image_swaps + int(i.sum())
    assert all(torch.equal(x, y) for x, y in zip(train.swap_modality(b, 0.5, 7, 3).values(),
                                                  train.swap_modality(b, 0.5, 7, 3).values()))
    # half of `fraction` each; a draw that may pick the sample itself would give 0.25 * 3/4 = 0.19
    assert text_swaps / n == pytest.approx(0.25, abs=0.025)
    assert image_swaps / n == pytest.approx(0.25, abs=0.025)


def test_swap_modality_is_a_function_of_seed_and_step():
    # noise fixed per run (not per step) would hide the same modality of the same samples at every step
    b = make_batch(B=4)
    draws = {(seed, step): train.swap_modality(b, 0.5, seed, step) for seed in range(2) for step in range(20)}
    rows = lambda o: (tuple((o["text"] != b["text"]).any(1).tolist()), tuple(o["text"][:, 1].tolist()),
                      tuple((o["image"] != b["image"]).flatten(1).any(1).tolist()))
    assert len({rows(o) for (seed, _), o in draws.items() if seed == 0}) > 5  # steps differ
    assert any(rows(draws[0, s]) != rows(draws[1, s]) for s in range(20))  # seeds differ
    assert rows(train.swap_modality(b, 0.5, 1, 7)) == rows(draws[1, 7])  # and it is a function


def test_tsa_reads_the_post_attention_state_h_not_ln2_h(tiny_clip):
    # the reference comparison catches "TSA reads LN2(h)" only narrowly (a fresh LN2 is near identity, so
    # LN(LN2(h)) ~ LN(h)): pin the TSA's input itself, the h that LN2 receives (Eq. 6), every layer of both
    m = model.FAMEViL(tiny_clip, {"xmr": MODEL_TASKS["xmr"]}, bottleneck=8).eval()
    seen, hooks = {}, []

    def keep(key):  # the first input a module receives (the hook returns None: the output stays)
        def hook(mod, inp, out):
            seen.setdefault(key, inp[0].clone())
        return hook
    towers = (("vision", m.clip.visual.transformer.resblocks), ("text", m.text.transformer.resblocks))
    for tower, blocks in towers:
        for i, block in enumerate(blocks):
            hooks.append(block.ln_2.register_forward_hook(keep(("ln_2", tower, i))))
            hooks.append(m.tsa[tower]["xmr"][i].register_forward_hook(keep(("tsa", tower, i))))
    with torch.no_grad():
        m.encode_image(torch.randn(2, 3, 32, 32), "xmr")
        m.encode_text(open_clip.tokenize(["red dress", "navy shirt with dots"], context_length=16), "xmr")
    for h in hooks:
        h.remove()
    for tower, _ in towers:
        for i in range(m.depth):
            assert torch.equal(seen["tsa", tower, i], seen["ln_2", tower, i]), (tower, i)


def test_fic_targets_computed_on_the_host_are_the_masked_positions(m):
    # the row's prepare gives the step the target positions (no device read); they are exactly the positions
    # a + L' * b whose next token is real (up to and including EOT), and the logits and loss are the same
    b = make_batch()
    prepared = TASKS["fic"].prepare(b)
    L1 = b["text"].shape[1] - 1
    eot = (b["text"] == EOT).int().argmax(-1)
    want = [r * L1 + a for r in range(len(eot)) for a in range(int(eot[r]))]
    assert prepared["targets"].tolist() == want and set(b) < set(prepared)
    with torch.no_grad():
        on_host, here = TASKS["fic"].logits(m, prepared, "fic"), TASKS["fic"].logits(m, b, "fic")
        assert torch.equal(on_host[0], here[0])
        assert torch.equal(TASKS["fic"].loss(on_host, prepared), TASKS["fic"].loss(here, b))
