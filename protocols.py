"""
The papers' evaluation protocols, as functions that the task rows of tasks.py name:

    protocol(model, task, row, val, opts) -> {result name: result}

`row` is the task's row, `val` its validation dataset (the row's layout), `opts` the evaluation options
(device, batch_size, workers, beam, caption_limit, pictures, and `memo`, where image features
are kept so that each image is encoded once per evaluation). A result is a dict:
    protocol   what was measured, in words          metrics, chance   {name: %}, chance = a random guess
    mu         the metric names whose mean is the task's mu (the paper's Sec. 4); absent: not in mu
    std, examples, pictures (rows of (text lines, [(prepared image, outline colour or heat map)])) optional
Chance levels are computed, never typed in.
"""
import contextlib
import math

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import cli
import data
from adapters import ModalityAttention
from model import EOT, eot_position
from metrics import (accuracy, caption_scores, chance_at, macro_f1, mean, recall_at_k, recall_at_precision,
                     recall_random100, zero_shot_predict)

RECALL_KEYS = [f"{d} R@{k}" for d in ("I->T", "T->I") for k in (1, 5, 10)]


def decode(ids):
    """(n,) ids from model.generate -> text: the ids strictly between SOT and the first EOT. The padding after
    EOT goes with it; id 0 before EOT is text ("!"), not padding."""
    ids = ids.tolist()[1:]
    if EOT in ids:
        ids = ids[:ids.index(EOT)]
    return open_clip.tokenizer._tokenizer.decode(ids).strip()


def prompt(name):  # the zero-shot prompt for a class name
    return f"a photo of {name.lower()}"


def batches(items, fn, opts, what):
    """fn(batch on the device, item indices (B,)) -> {name: (B, ...)} over a dataset (or a list of dicts),
    in order, under no_grad (+ bf16 autocast on CUDA). Returns {name: (N, ...)} on the device; progress with
    a rate and an ETA every ~10 % to stderr once it has taken 5 s."""
    cuda = opts.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(items, opts.batch_size, num_workers=opts.workers, pin_memory=cuda)
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    out, start = {}, 0
    for b in cli.progress(loader, len(loader), f"{what}, batches of {opts.batch_size}"):
        b = data.to_device(b, opts.device)  # uint8 images normalised on the device
        n = len(next(iter(b.values())))
        with torch.no_grad(), amp:
            for k, v in fn(b, torch.arange(start, start + n)).items():
                out.setdefault(k, []).append(v.float() if v.is_floating_point() else v)
        start += n
    return {k: torch.cat(v) for k, v in out.items()}


def encode(model, items, key, task, opts, what):
    """(N, E) unit-norm contrastive features of items[key] ("image" / "text"); the cosine ranks like the
    retrieval head (its scale is common to all)."""
    enc = model.encode_image if key == "image" else model.encode_text
    return batches(items, lambda b, _: {"f": F.normalize(enc(b[key], task), dim=-1)}, opts, what)["f"]


def image_features(model, val, task, opts):
    """encode() of a validation set's images, once per evaluation (retrieval and zero-shot share them).
    Kept by the dataset's id: evaluate.py holds every dataset until the end, so no id is reused."""
    if (id(val), task) not in opts.memo:
        opts.memo[id(val), task] = encode(model, val, "image", task, opts, f"{task} images")
    return opts.memo[id(val), task]


# ----------------------------------------------------------------------------- cross-modal retrieval
def retrieval(model, task, row, val, opts):
    """XMR full (the supplement's Table 2, the protocol of the ablations) and random-100 (Table 1) from ONE
    encoding of the val images and product texts."""
    img = image_features(model, val, task, opts)  # (I, E)
    texts = [{"text": t} for t in val.tokens]  # each product's text, tokenised when the data was prepared
    txt = encode(model, texts, "text", task, opts, f"{task} texts")  # (P, E)
    P, I, owner = len(txt), len(img), val.image_product  # owner (I,): each image's product
    views = torch.bincount(owner, minlength=P).numpy()  # (P,)
    i2t = recall_at_k(img, txt, owner, torch.arange(P))  # an image's positive: its text
    t2i = recall_at_k(txt, img, torch.arange(P), owner)  # a text's positives: its views
    full = {**{f"I->T R@{k}": v for k, v in i2t.items()}, **{f"T->I R@{k}": v for k, v in t2i.items()}}
    # k[7:] is the K of "I->T R@K"; a T->I query has as many positives as its product has views
    chance = {k: chance_at(int(k[7:]), 1, P) if k[0] == "I" else chance_at(int(k[7:]), views, I)
              for k in RECALL_KEYS}
    full = dict(metrics={**full, "mean": mean(full.values())},
                chance={**chance, "mean": mean(chance.values())},
                protocol=f"{task.upper()} full: each of {I} val images vs all {P} product texts (I->T); each "
                         f"text vs all images, a hit if any view of its product is in the top K (T->I)")
    # random-100 groups by the class attribute's NAMES (FashionGen's sub-category): val-only classes (unknown
    # labels) still form groups
    names = [r["labels"].get(val.class_attribute, "") for r in val.products]
    sub = np.unique(names, return_inverse=True)[1]  # (P,)
    n_neg = min(100, P - 1)  # a small val set has fewer than 101 products
    # (P,) one seeded view per product: the index of its first image + a random offset
    pick = np.cumsum(views) - views + np.random.default_rng(0).integers(views)
    r = {"I->T": recall_random100(img, txt, owner.numpy(), sub, np.arange(P), n_neg=n_neg),
         "T->I": recall_random100(txt, img, pick, sub[owner.numpy()], owner.numpy(), n_neg=n_neg)}
    metrics = {f"{d} R@{k}": avg for d, (by_k, _) in r.items() for k, (avg, sd) in by_k.items()}
    std = {f"{d} R@{k}": sd for d, (by_k, _) in r.items() for k, (avg, sd) in by_k.items()}
    chance = {k: chance_at(int(k[7:]), 1, n_neg + 1) for k in RECALL_KEYS}
    filled = {d: f for d, (_, f) in r.items()}
    random100 = dict(
        metrics={**metrics, "mean": mean(metrics.values())}, chance={**chance, "mean": mean(chance.values())},
        std=std, mu=RECALL_KEYS, n_neg=n_neg, filled=filled,
        protocol=f"{task.upper()} random-100: {min(1000, I)} I->T and {min(1000, P)} T->I queries per draw, "
                 f"each vs its positive + {n_neg} negatives of its {val.class_attribute} (other products; "
                 f"filled from others where too few: I->T {filled['I->T']}, T->I {filled['T->I']} of 5 "
                 f"draws' queries), 5 seeded draws, mean ± std; mu = the six R@K")
    if opts.pictures:  # the first product texts as queries, their top 5 images (the true product's green)
        rows = []
        for p in range(min(3, P)):
            top = (txt[p] @ img.T).topk(min(5, I)).indices.tolist()
            rows.append(([f"query: {val.texts[p]}"],
                         [(val.image(i), "green" if owner[i] == p else None) for i in top]))
        full["pictures"] = {f"{task}_top5": rows}
    return {f"{task}_full": full, f"{task}_random100": random100}


def zero_shot(model, task, row, val, opts):
    """FashionCLIP-style recognition with no trained head: each val image's nearest prompt
    "a photo of <class>" (the class attribute: FashionGen's sub-category), in contrastive mode with this
    task's TSA."""
    names = val.labels[val.class_attribute]
    prompts = [{"text": t} for t in data.tokenize([prompt(n) for n in names], model.context_length)]
    cls = encode(model, prompts, "text", task, opts, "prompts")  # (C, E)
    img = image_features(model, val, task, opts)  # (I, E), shared with retrieval
    res = dict(metrics={}, chance={},
               protocol=f"zero-shot recognition: val images vs {len(names)} prompts 'a photo of "
                        f"<{val.class_attribute}>', cosine argmax, contrastive mode with the {task} TSA; "
                        f"chance = the majority class")
    pred = F.one_hot(zero_shot_predict(img, cls), len(names)).float().cpu()  # (I, C)
    class_scores(res, val.attrs[val.image_product, val.column("class")], pred, which=("accuracy", "macro-F1"))
    return {f"{task}_zeroshot": res}


# ----------------------------------------------------------------------------- text-guided image retrieval
def composed_retrieval(model, task, row, val, opts):
    """TGIR (Table 2): per category, each val triplet's fused (reference, joined captions) query vs the
    category's whole val gallery (reference kept: the official / CLIP4Cir protocol), each gallery image
    encoded once."""
    def query(b, _):  # (T, E) fused queries, with each one's category and target
        return {"f": F.normalize(model.fuse(b["ref"], b["text"], task), dim=-1), "cat": b["category"],
                "target": b["target_index"]}
    q = batches(val, query, opts, f"{task} queries")
    res, rows = dict(metrics={}, chance={}), []
    for c, cat in enumerate(val.categories):
        sel = q["cat"] == c  # (T,) this category's queries
        if not sel.any():  # a small (toy) val split may have no triplet in a category
            continue
        gallery = val.gallery(cat)
        feats = encode(model, gallery, "image", task, opts, f"{task} {cat} gallery")  # (G, E)
        for k, v in recall_at_k(q["f"][sel], feats, q["target"][sel], torch.arange(len(gallery)),
                                (1, 10, 50)).items():
            res["metrics"][f"{cat} R@{k}"], res["chance"][f"{cat} R@{k}"] = v, chance_at(k, 1, len(gallery))
        for j in sel.nonzero()[:1, 0].tolist() if opts.pictures else []:  # reference blue, target green
            c_, t, target = val.triplets[j]
            top = (q["f"][j] @ feats.T).topk(min(5, len(gallery))).indices.tolist()
            hits = [(val.image(gallery.asins[i]), "green" if i == target else None) for i in top]
            reference = (val.image(t["candidate"]), "blue")
            rows.append(([f"{cat}: {val.join.join(t['captions'])}"], [reference] + hits))
    res["mu"] = [k for k in res["metrics"] if not k.endswith("R@1")]  # the paper's R@10, R@50
    for d in (res["metrics"], res["chance"]):  # + each R@K's mean over the categories
        d.update({f"mean R@{k}": mean(v for n, v in d.items() if n.endswith(f" R@{k}")) for k in (1, 10, 50)})
    res["protocol"] = (f"{task.upper()}: {len(val)} val triplets, captions joined with {val.join!r}, each "
                       f"fused query vs its category's val gallery; mu = mean of every per-category R@10 and "
                       f"R@50 (R@1: informative on small galleries)")
    if rows:
        res["pictures"] = {f"{task}_top5": rows}
    return {task: res}


# ----------------------------------------------------------------------------- classification
def class_scores(res, y, probs, pre="", post="", which=("accuracy", "macro-F1", "R@90%P")):
    """Adds the metrics `which` of probs (N, C) vs labels y (N,) to res, and the same for the chance
    predictor (the majority class). Items labelled -1 (a class the model does not know) are left out."""
    probs, y = probs[y >= 0], y[y >= 0]
    if not len(y):
        return
    major = F.one_hot(torch.full_like(y, int(y.mode().values)), probs.shape[1]).float()  # (N, C)
    fns = {"accuracy": lambda p: accuracy(y, p.argmax(1)), "macro-F1": lambda p: macro_f1(y, p.argmax(1)),
           "R@90%P": lambda p: recall_at_precision(p, y)}
    for name in which:
        key = pre + name + post
        res["metrics"][key], res["chance"][key] = fns[name](probs), fns[name](major)


def classification(model, task, row, val, opts):
    """SCR (Table 3) or any classifier row of image + text (CMA-CLIP: one head per attribute), with
    CMA-CLIP's noisy-modality check in the same pass: each batch is classified clean, with the texts
    shuffled (image j + the text of item perm[j]) and with the images shuffled (item i sees image perm[i],
    i.e. image j + the text of item inv[j], judged against inv[j]'s labels); perm is one seeded
    permutation of the val images (an item may keep its product's text by chance). Where the model
    weighs the modalities (CMA-CLIP's modality-wise attention), also its mean lambda (image weight)."""
    heads = val.attributes if row.head == "attributes" else [row.head]  # one logit tensor per attribute
    # the modality-wise attentions of this task, by attribute (CMA-CLIP) or task (--fusion modality)
    weighers = {name.split(".")[-1]: m for name, m in model.named_modules()
                if isinstance(m, ModalityAttention) and name.startswith((f"heads.{task}.", f"fusers.{task}"))}
    lams = {}  # attribute -> lambda (B,) of the latest forward
    hooks = [m.register_forward_hook(lambda mod, i, o, a=a: lams.__setitem__(a, o[1]))
             for a, m in weighers.items()]
    n, texts = len(val), val.tokens  # texts (P, L): each product's, tokenised when the data was prepared
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    # row j of each variant: image j + the text of item partner[variant][j]
    partner = {"clean": torch.arange(n)}
    if opts.noisy:  # CMA-CLIP's check: two more forwards per batch
        partner.update({"texts shuffled": perm, "images shuffled": perm.argsort()})

    def step(b, idx):
        out = {}
        for v, other in partner.items():
            tokens = texts[val.image_product[other[idx]]].to(opts.device)  # (B, L)
            logits = row.logits(model, dict(b, text=tokens), task)
            out.update({f"{v}/{h}": x.softmax(-1) for h, x in zip(heads, logits)})
            out.update({f"{v}/lambda/{a}": lam for a, lam in lams.items()})
        return out
    out = batches(val, step, opts, task.upper())
    for hook in hooks:
        hook.remove()
    columns = [val.column(h) for h in heads]
    labels = val.attrs[val.image_product][:, columns]  # (I, heads), -1 = unknown
    res = dict(metrics={}, chance={}, lambda_image_weight={})
    # whose labels row j is judged by: with the images shuffled, the item whose text it has (that item
    # sees image j); otherwise item j, whose image it shows
    judges = {v: torch.arange(n) if v == "texts shuffled" else p for v, p in partner.items()}
    single = len(heads) == 1
    for a, h in enumerate(heads):
        for v, judge in judges.items():
            pre = "" if single else h + " "
            post = "" if v == "clean" else f", {v}"
            which = ("accuracy", "macro-F1", "R@90%P") if v == "clean" else ("accuracy",)
            class_scores(res, labels[judge, a], out[f"{v}/{h}"].cpu(), pre, post, which)
    for a in weighers:
        res["lambda_image_weight"][a] = {v: out[f"{v}/lambda/{a}"].mean().item() for v in partner}
    res["mu"] = ["accuracy", "macro-F1"] if single else [f"{h} accuracy" for h in heads]
    skipped = int((labels < 0).any(1).sum())
    named = [val.class_attribute if h == "class" else h for h in heads]
    noisy = "noisy modality: texts / images shuffled; " if opts.noisy else ""
    res["protocol"] = (f"{task.upper()}: {', '.join(named)} of image + text, {n} val images ({skipped} "
                       f"labelled -1 skipped); macro-F1 over the classes in labels or predictions (sklearn "
                       f"'macro'); {noisy}chance = the majority class; mu = mean({', '.join(res['mu'])})")
    if opts.pictures and row.mode == "fusion" and "text" in model.xaa:
        res["pictures"] = {f"{task}_attention": attention_rows(model, task, val, texts, opts)}
    return {task: res}


def attention_rows(model, task, val, texts, opts, n=6):
    """The last text-side XAA's text-to-image attention over fused inputs (the supplement's Fig. 4): the
    EOT query's head-averaged weights over the image patches, for the first n val images."""
    seen, xaa, idx = [], model.xaa["text"][-1], range(min(n, len(val)))
    hook = xaa.register_forward_hook(lambda mod, inputs, o: seen.append(inputs))  # (text h, vision h, pad)
    tokens = texts[val.image_product[list(idx)]].to(opts.device)  # (n, L)
    with torch.no_grad():
        images = data.to_device({"image": torch.stack([val[i]["image"] for i in idx])}, opts.device)["image"]
        model.fuse(images, tokens, task)
        att = xaa.attention_map(*seen[-1])  # (n, L, P): text-to-image weights
        att = att[torch.arange(len(idx)), eot_position(tokens), 1:]  # (n, P - 1): EOT's row, no class token
    hook.remove()
    grid = math.isqrt(att.shape[1])
    maps = att.view(len(idx), grid, grid).float().cpu().numpy()  # the patch grid
    return [([f"{task} input: {val.texts[val.image_product[i]]}"],
             [(val.image(i), None), (val.image(i), a)]) for i, a in zip(idx, maps)]


# ----------------------------------------------------------------------------- captioning
def captioning(model, task, row, val, opts):
    """FIC (Table 3): caption the first N val images from SOT (greedy or beam) up to the text context;
    reference = the product text. Chance = the text of a random other product whose text differs (two
    products may share one) as the caption."""
    n = min(opts.caption_limit or len(val), len(val))
    L = model.context_length - 1  # SOT + L tokens fill the context

    def step(b, _):
        ids = model.generate(b["image"], task, L, opts.beam)  # (B, 1 + n<=L)
        return {"ids": F.pad(ids, (0, L + 1 - ids.shape[1]))}  # batches are concatenated: pad to 1 + L
    ids = batches(torch.utils.data.Subset(val, range(n)), step, opts, task.upper())["ids"].cpu()
    owner, P = val.image_product[:n].numpy(), len(val.texts)
    refs, hyps = {i: [val.texts[p]] for i, p in enumerate(owner)}, {i: decode(t) for i, t in enumerate(ids)}
    texts, rng = np.array(val.texts, dtype=object), np.random.default_rng(0)
    if len(set(val.texts)) < 2:
        raise ValueError(f"{task}: every val product has the same text, so no caption can serve as chance")
    other = (owner + rng.integers(1, P, n)) % P  # a random other product per image ...
    while (same := texts[other] == texts[owner]).any():  # ... drawn again where it shares the image's text
        other[same] = (owner[same] + rng.integers(1, P, int(same.sum()))) % P
    other_texts = {i: texts[p] for i, p in enumerate(other)}
    ours, rand = caption_scores(refs, hyps, other_texts)
    keys = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    decoding = f"beam {opts.beam}" if opts.beam > 1 else "greedy"
    res = dict(metrics={k: ours[k] for k in keys}, chance={k: rand[k] for k in keys}, mu=keys, n=n,
               examples=[{"caption": hyps[i], "truth": refs[i][0]} for i in range(min(n, 5))],
               protocol=f"{task.upper()}: first {n} of {len(val)} val images, {decoding}, <= {L} tokens, "
                        f"reference = the product text, {ours['tokenizer']} tokenizer; chance = another "
                        f"product's text; mu = mean of the four")
    if opts.pictures:
        res["pictures"] = {f"{task}_captions": [([f"caption: {hyps[i]}", f"truth: {refs[i][0]}"],
                                                 [(val.image(i), None)]) for i in range(min(6, n))]}
    return {task: res}
