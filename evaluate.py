"""Evaluation: every protocol of DESIGN §8 on a checkpoint, a summary against chance / the papers, pictures.

    python evaluate.py out/ckpt.pt [--tasks all|xmr,tgir,scr,zeroshot,fic,cma] [--json r.json]
                       [--pictures DIR] [--stl a.pt,b.pt] [--beam N] [--batch_size B] [--fic_limit N]
                       [--data ROOT] [--device cpu|cuda]

Top half: metrics, pure functions of features / predictions. Bottom half: the protocols, which encode
each image and each text once per evaluation and rank in chunks.
"""
import argparse, contextlib, json, math, os, re, shutil, sys, textwrap, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
from model import from_checkpoint, param_table, read_checkpoint

# ---- metrics (pure functions of features / predictions) ----
# Percentages are 0-100 floats, as the papers print them. Ties always count against the query.


def recall_at_k(queries, gallery, query_ids, gallery_ids, ks=(1, 5, 10), chunk=1024):
    """R@K (%) of normalised queries (Q,D) against a gallery (G,D).

    Gallery item j is a positive of query i iff gallery_ids[j] == query_ids[i]. One rule covers
    I->T (one text per product), product-level T->I (hit if ANY view is in the top K) and TGIR
    (gallery_ids = arange(G), query_ids = target index). rank = #negatives scoring >= the best
    positive, hit@K iff rank < K. Chunks of `chunk` queries keep memory at ~chunk*G floats.
    """
    query_ids = torch.as_tensor(query_ids, device=queries.device)         # (Q,)
    gallery_ids = torch.as_tensor(gallery_ids, device=queries.device)     # (G,)
    hits = {k: 0 for k in ks}
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ gallery.T                             # (c, G)
        pos = query_ids[s:s + chunk, None] == gallery_ids[None, :]         # (c, G) bool, 1 byte/elem
        row, col = pos.nonzero(as_tuple=True)                              # (P,) few positives per query
        # best positive per query via a scatter over the P positives: no second (c, G) float matrix
        best = sim.new_full((len(sim),), -float("inf"))                   # (c,)
        best = best.scatter_reduce(0, row, sim[row, col], "amax")
        if torch.isinf(best).any():
            bad = s + int(torch.isinf(best).nonzero()[0])
            raise ValueError(f"query {bad} (id {query_ids[bad].item()}) has no positive in the gallery")
        sim.masked_fill_(pos, -float("inf"))                               # positives are not negatives
        # in place, then a float sum: reducing a (c, G) bool would materialise an int64 copy (8x)
        rank = sim.ge_(best[:, None]).sum(1)                               # (c,) exact counts < 2^24
        del sim, pos                       # freed before the next chunk's matmul, not after it
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: 100.0 * hits[k] / len(queries) for k in ks}


def random100_candidates(pos, cand_group, cand_owner, rng, n_neg=100):
    """Candidate indices (1+n_neg,) for one query: [pos, n_neg negatives], and whether filling was needed.

    Negatives are drawn without replacement from candidates of the positive's sub-category owned by
    other products; if there are fewer than n_neg, all of them are taken and the rest drawn from
    other sub-categories (still other products). cand_group/cand_owner are numpy arrays (C,).
    """
    group, owner = cand_group[pos], cand_owner[pos]
    others = cand_owner != owner                                           # (C,) bool
    pool = np.flatnonzero(others & (cand_group == group))
    if len(pool) >= n_neg:
        return np.concatenate([[pos], rng.choice(pool, n_neg, replace=False)]), False
    rest = np.flatnonzero(others & (cand_group != group))
    if len(pool) + len(rest) < n_neg:
        raise ValueError(f"only {len(pool) + len(rest)} negatives for candidate {pos}; need {n_neg}")
    return np.concatenate([[pos], pool, rng.choice(rest, n_neg - len(pool), replace=False)]), True


def recall_random100(queries, cands, query_pos, cand_group, cand_owner, n_queries=1000, draws=5, seed=0,
                     ks=(1, 5, 10), n_neg=100):
    """FashionGen "random-100" R@K (Table 1): returns ({k: (mean, std)}, n_filled).

    Each query is scored against its positive + n_neg negatives of the same sub-category from other
    products (see random100_candidates), using features encoded once: queries (Q,D), cands (C,D).
    query_pos (Q,) = index into cands of each query's positive; the query's sub-category and
    product are those of its positive, so they need no separate arguments:
      I->T: recall_random100(img_f, txt_f, query_pos=row of the image's product text,
                             cand_group=text sub-category, cand_owner=text product id)
      T->I: recall_random100(txt_f, img_f, query_pos=one view per product, picked with a seeded rng,
                             cand_group=image sub-category, cand_owner=image product id)
    Draw d (own rng = default_rng([seed, d])) samples min(n_queries, Q) queries without replacement,
    then each query's negatives. std is over the draws (numpy's ddof=0). n_filled = number of
    (draw, query) pairs that needed negatives from other sub-categories (also printed if > 0).
    """
    query_pos, cand_group, cand_owner = (np.asarray(a) for a in (query_pos, cand_group, cand_owner))
    per_draw, n_filled = {k: [] for k in ks}, 0
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        qs = rng.choice(len(queries), min(n_queries, len(queries)), replace=False)
        ranks = []
        for q in qs:
            idx, filled = random100_candidates(query_pos[q], cand_group, cand_owner, rng, n_neg)
            n_filled += filled
            sim = cands[torch.as_tensor(idx, device=cands.device)] @ queries[q]      # (1+n_neg,)
            ranks.append(int((sim[1:] >= sim[0]).sum()))                # ties count against the query
        for k in ks:
            per_draw[k].append(100.0 * np.mean(np.array(ranks) < k))
    if n_filled:
        print(f"random-100: {n_filled} of {draws} x {len(qs)} queries had < {n_neg} same-sub-category "
              f"negatives; filled from other sub-categories")
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in per_draw.items()}, n_filled


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def accuracy(y_true, y_pred):
    return 100.0 * float(np.mean(_np(y_true) == _np(y_pred)))


def macro_f1(y_true, y_pred):
    """sklearn f1_score(average='macro'): unweighted mean over classes in y_true OR y_pred (%).

    F1 = 2TP / (2TP + FP + FN), which equals 2PR/(P+R) and is 0 when TP = 0 (sklearn's zero_division=0).
    """
    t, p = _np(y_true), _np(y_pred)
    f1 = []
    for c in np.union1d(t, p):
        tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return 100.0 * float(np.mean(f1))


def _fallback_tokenize(s):
    # Approximates PTBTokenizer(-lowerCase) + pycocoevalcap's punctuation removal: lowercase words,
    # intra-word '-' and "'" kept, everything else dropped. Scores are then NOT comparable to papers.
    return " ".join(re.findall(r"\w+(?:[-']\w+)*", s.lower()))


def caption_scores(refs, hyps):
    """{id: [ref str, ...]}, {id: hyp str} -> BLEU-4, METEOR, ROUGE-L, CIDEr (x100) via pycocoevalcap.

    CIDEr's IDF comes from the evaluated references (coco-caption's behaviour). Without Java: the
    fallback tokenizer above and METEOR = None, with a warning.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    assert refs.keys() == hyps.keys(), "refs and hyps must cover the same ids"
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        meteor = Meteor()  # starts its JVM now: the ~9 s paraphrase-table load overlaps the work below
        # refs and hyps go through ONE tokenizer call: each call spawns a JVM
        tok = PTBTokenizer().tokenize({**{("r", i): [{"caption": c} for c in refs[i]] for i in refs},
                                       **{("h", i): [{"caption": hyps[i]}] for i in hyps}})
        gts, res = {i: tok[("r", i)] for i in refs}, {i: tok[("h", i)] for i in hyps}
    else:
        print("warning: java not found: regex tokenizer instead of PTB, METEOR skipped")
        gts = {i: [_fallback_tokenize(c) for c in refs[i]] for i in refs}
        res = {i: [_fallback_tokenize(hyps[i])] for i in hyps}
    out = {"BLEU-4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3], "METEOR": None,
           "ROUGE-L": 100 * Rouge().compute_score(gts, res)[0],
           "CIDEr": 100 * Cider().compute_score(gts, res)[0]}
    if java:
        out["METEOR"] = 100 * meteor.compute_score(gts, res)[0]
        del meteor                              # its __del__ ends the JVM now, not at exit
    out = {k: None if v is None else float(v) for k, v in out.items()}
    out["tokenizer"] = "ptb" if java else "fallback"
    return out


def recall_at_precision(probs, labels, precision=0.9):
    """CMA-CLIP's recall at a precision target (%), one multi-class attribute: probs (N,C), labels (N,).

    Predict argmax, confidence = max prob; for each threshold t (a distinct confidence), precision(t)
    = correct/kept among conf >= t, recall(t) = correct kept / N; max recall with precision(t) >=
    target, 0 if none. Equal confidences are one step: a cut never splits a tie.
    """
    conf, pred = probs.max(1)                                              # (N,), (N,)
    order = conf.argsort(descending=True)
    conf, correct = conf[order], (pred == labels)[order].double()          # (N,)
    tp, kept = correct.cumsum(0), torch.arange(1, len(conf) + 1, dtype=torch.float64, device=conf.device)
    last = torch.ones_like(conf, dtype=torch.bool)                         # last position of each tie run
    last[:-1] = conf[1:] != conf[:-1]
    ok = (tp / kept)[last] >= precision                                    # double: 9/10 >= 0.9 is exact
    return 100.0 * float((tp[last][ok] / len(conf)).max()) if ok.any() else 0.0


def zero_shot_predict(image_feats, class_text_feats):
    """(N,D), (C,D) -> (N,) class index of the highest cosine similarity."""
    # only the class side needs normalising: scaling an image row does not change its argmax
    return (image_feats @ F.normalize(class_text_feats, dim=-1).T).argmax(1)  # (N,)


# ---- protocols (DESIGN §8): a checkpoint in, a results dict out ----
# Each protocol gives {"protocol": what was measured, "metrics": {name: %}, "chance": {name: %}, ...};
# "mu_keys" are the headline metrics whose mean is the task's mu (the paper's Sec. 4). Chance levels
# are computed, never typed in.
XMR_KEYS = [f"{d} R@{k}" for d in ("I->T", "T->I") for k in (1, 5, 10)]
# the papers' figures (DESIGN §8)
PAPER = {"xmr_random100": dict(zip(XMR_KEYS, (65.94, 91.92, 97.22, 62.86, 87.38, 93.52))),  # Table 1
         "xmr_full": dict(zip(XMR_KEYS, (45.99, 73.25, 81.84, 53.12, 77.55, 86.02))),  # Table 6, 3 seeds
         "tgir": dict(zip([f"{c} R@{k}" for c in ("dress", "shirt", "toptee") for k in (10, 50)],
                          (42.19, 67.38, 47.64, 68.79, 50.69, 73.07))),  # Table 2
         "scr": {"accuracy": 94.67, "macro-F1": 88.21},  # Table 3
         "fic": {"BLEU-4": 30.73, "METEOR": 25.04, "ROUGE-L": 55.83, "CIDEr": 150.4}}  # Table 3
PROTOCOLS = ("xmr", "tgir", "scr", "zeroshot", "fic", "cma")  # --tasks names; zeroshot needs no task
EOT = open_clip.tokenizer._tokenizer.eot_token_id


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, train config + "step" + "labels", tokenizer, image size)."""
    ckpt = read_checkpoint(path)
    m = from_checkpoint(ckpt)  # the architecture from its model_args, without any download
    cfg = {**ckpt["config"], "step": ckpt["step"], "labels": ckpt["model_args"].get("labels", {})}
    return m.to(device).eval(), cfg, data.get_tokenizer(cfg["model"], cfg["context_length"]), m.image_size


def contrastive_task(m):
    """Whose TSA zero-shot and sample.py's retrieval use: XMR's, trained to align the towers; else TGIR's
    (contrastive on its target side); else the first task's (any TSA can run in contrastive mode)."""
    return next((t for t in ("xmr", "tgir") if t in m.tasks), next(iter(m.tasks)))


def decode(ids):
    """(n,) ids from generate -> text: SOT dropped, cut at EOT, padding (id 0) dropped."""
    ids = ids.tolist()[1:]
    if EOT in ids:
        ids = ids[:ids.index(EOT)]
    return open_clip.tokenizer._tokenizer.decode([i for i in ids if i]).strip()


def chance_at(k, n_pos, n):
    """R@K (%) of a random ranking of n candidates, n_pos of them positive (per query: an array)."""
    # P(miss) = P(none of the first min(k, n) draws without replacement is a positive)
    miss = np.prod([np.clip((n - np.asarray(n_pos) - i) / (n - i), 0, 1) for i in range(min(k, n))], axis=0)
    return float(100 * np.mean(1 - miss))


def mean(xs):
    xs = [x for x in xs if x is not None]  # METEOR is None without Java
    return float(np.mean(xs)) if xs else None


def batches(items, fn, args, what):
    """fn(batch on the device, item indices (B,)) -> {name: (B, ...)} over a dataset (or a list of dicts),
    in order, under no_grad (+ bf16 autocast on CUDA). Returns {name: (N, ...)} on the device; progress
    every ~10 % to stderr."""
    cuda = args.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(items, args.batch_size, num_workers=args.workers, pin_memory=cuda)
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    out, start, t0 = {}, 0, time.time()
    for i, b in enumerate(loader):
        b = {k: v.to(args.device, non_blocking=True) for k, v in b.items()}
        n = len(next(iter(b.values())))
        with torch.no_grad(), amp:
            for k, v in fn(b, torch.arange(start, start + n)).items():
                out.setdefault(k, []).append(v.float() if v.is_floating_point() else v)
        start += n
        if len(loader) >= 20 and (i + 1) % (len(loader) // 10) == 0:
            print(f"  {what}: {i + 1}/{len(loader)} batches, {time.time() - t0:.0f} s", file=sys.stderr)
    return {k: torch.cat(v) for k, v in out.items()}


def encode(m, items, key, task, args, what):
    """(N, E) contrastive features of items[key] ("image" / "text"), unit norm."""
    # cosine ranks like the head: the head's scale is common to all
    enc = m.encode_image if key == "image" else m.encode_text
    return batches(items, lambda b, _: {"f": F.normalize(enc(b[key], task), dim=-1)}, args, what)["f"]


def xmr(img, txt, ds):
    """XMR full (Table 6) and random-100 (Table 1) from ONE encoding: img (I, E) per val image,
    txt (P, E) per product."""
    P, I, owner = len(txt), len(img), ds.image_product                     # owner (I,): each image's product
    views = torch.bincount(owner, minlength=P).numpy()                     # (P,)
    i2t = recall_at_k(img, txt, owner, torch.arange(P))                    # an image's positive: its text
    t2i = recall_at_k(txt, img, torch.arange(P), owner)                    # a text's positives: its views
    full = {**{f"I->T R@{k}": v for k, v in i2t.items()}, **{f"T->I R@{k}": v for k, v in t2i.items()}}
    # k[7:] is the K of "I->T R@K"; a T->I query has as many positives as its product has views
    chance = {k: chance_at(int(k[7:]), 1, P) if k[0] == "I" else chance_at(int(k[7:]), views, I)
              for k in XMR_KEYS}
    full = dict(task="xmr", metrics={**full, "mean": mean(full.values())},
                chance={**chance, "mean": mean(chance.values())},
                protocol=f"XMR full: each of {I} val images vs all {P} product texts (I->T); each text vs "
                         f"all images, a hit if any view of its product is in the top K (T->I)")
    # random-100 groups by sub-category NAME (as codes), so val-only classes (label -1) still form groups
    sub = np.unique([r["subcategory"] for r in ds.products], return_inverse=True)[1]  # (P,)
    n_neg = min(100, P - 1)  # a toy val set has fewer than 101 products
    # (P,) one seeded view per product: the index of its first image + a random offset
    pick = np.cumsum(views) - views + np.random.default_rng(0).integers(views)
    r = {"I->T": recall_random100(img, txt, owner.numpy(), sub, np.arange(P), n_neg=n_neg),
         "T->I": recall_random100(txt, img, pick, sub[owner.numpy()], owner.numpy(), n_neg=n_neg)}
    metrics = {f"{d} R@{k}": avg for d, (by_k, _) in r.items() for k, (avg, sd) in by_k.items()}
    std = {f"{d} R@{k}": sd for d, (by_k, _) in r.items() for k, (avg, sd) in by_k.items()}
    chance = {k: chance_at(int(k[7:]), 1, n_neg + 1) for k in XMR_KEYS}
    random100 = dict(
        task="xmr", metrics={**metrics, "mean": mean(metrics.values())},
        chance={**chance, "mean": mean(chance.values())},
        std=std, mu_keys=XMR_KEYS, n_neg=n_neg, filled={d: f for d, (_, f) in r.items()},
        protocol=f"XMR random-100: {min(1000, I)} I->T and {min(1000, P)} T->I queries per draw, each vs its "
                 f"positive + {n_neg} negatives of its sub-category (other products), 5 seeded draws, "
                 f"mean ± std; mu = the six R@K")
    return full, random100


def tgir(m, tok, size, cfg, args):
    """TGIR (Table 2): per category, each val triplet's fused (reference, joined captions) query vs the
    category's whole val gallery (reference kept: the official / CLIP4Cir protocol), each gallery image
    encoded once."""
    ds = data.TripletDataset(args.data, "val", tok, size, train=False, join=cfg["caption_join"])
    q = batches(ds, lambda b, _: {"f": F.normalize(m.fuse(b["ref"], b["text"], "tgir"), dim=-1),  # (T, E)
                                  "cat": b["category"], "target": b["target_index"]}, args, "TGIR queries")
    res, galleries = dict(task="tgir", metrics={}, chance={}), {}
    for c, cat in enumerate(ds.categories):
        sel = q["cat"] == c  # (T,) this category's queries
        if not sel.any():  # a small (toy) val split may have no triplet in a category
            continue
        g = data.GalleryDataset(args.data, cat, "val", size)
        gf = encode(m, g, "image", "tgir", args, f"TGIR {cat} gallery")  # (G, E)
        galleries[cat] = g, gf
        for k, v in recall_at_k(q["f"][sel], gf, q["target"][sel], torch.arange(len(g)), (1, 10, 50)).items():
            res["metrics"][f"{cat} R@{k}"], res["chance"][f"{cat} R@{k}"] = v, chance_at(k, 1, len(g))
    res["mu_keys"] = [k for k in res["metrics"] if not k.endswith("R@1")]  # the paper's R@10, R@50
    for d in (res["metrics"], res["chance"]):  # + each R@K's mean over the categories
        means = {f"mean R@{k}": mean(v for n, v in d.items() if n.endswith(f" R@{k}")) for k in (1, 10, 50)}
        d.update(means)
    res["protocol"] = (f"TGIR: {len(ds)} val triplets, captions joined with {cfg['caption_join']!r}, each "
                       f"fused query vs its category's val gallery; mu = mean of every per-category R@10 and "
                       f"R@50 (R@1: informative on small galleries)")
    return res, (ds, q, galleries)


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


def classify(m, ds, tok, args, task):
    """SCR (Table 3: fused image + text -> sub-category) or CMA-CLIP's per-attribute heads (task "cma"),
    with the noisy-modality check (DESIGN §9) in the same pass: each batch is classified clean, with the
    texts shuffled (image j + the text of item perm[j]) and with the images shuffled (item i sees image
    perm[i], i.e. image j + the text of item inv[j], judged against inv[j]'s labels); perm is one seeded
    permutation of the val images (an item may keep its product's text by chance). Where the model has a
    modality-wise attention, also its mean lambda (image weight)."""
    # fuse() returns only the fused feature: a hook catches the modality-wise attention's lambda
    lams, hook = [], None
    if task in m.fusers:
        hook = m.fusers[task].register_forward_hook(lambda mod, i, o: lams.append(o[1]))
    # CMA's heads are its attributes: a prefix of data.ATTRIBUTES
    heads = ["scr"] if task == "scr" else list(m.tasks["cma"][1][1])
    n, texts = len(ds), tok(ds.texts)  # texts (P, L): each product's, tokenised once
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    # row j of each variant: image j + the text of item partner[variant][j]
    partner = {"clean": torch.arange(n), "texts shuffled": perm, "images shuffled": perm.argsort()}

    def step(b, idx):
        out = {}
        for v, other in partner.items():
            tokens = texts[ds.image_product[other[idx]]].to(args.device)  # (B, L)
            if task == "scr":
                logits = (m.heads["scr"](m.fuse(b["image"], tokens, "scr")),)
                lam = {"scr": lams.pop()} if hook else {}
            else:
                logits, lam = m.heads["cma"](*m.encode_tokens(b["image"], tokens, "cma"), tokens)
            out.update({f"{v}/{h}": x.softmax(-1) for h, x in zip(heads, logits)})
            out.update({f"{v}/lambda/{h}": x for h, x in lam.items()})
        return out
    out = batches(ds, step, args, task.upper())
    if hook:
        hook.remove()
    columns = [1] if task == "scr" else list(range(len(heads)))
    labels = ds.attrs[ds.image_product][:, columns]  # (I, heads), -1 = unknown
    res = dict(task=task, metrics={}, chance={}, lambda_image_weight={})
    # whose labels row j is judged by: with the images shuffled, the item whose text it has (that item
    # sees image j); otherwise item j, whose image it shows
    judges = {**partner, "texts shuffled": torch.arange(n)}
    for a, h in enumerate(heads):
        for v, judge in judges.items():
            pre = "" if task == "scr" else h + " "
            post = "" if v == "clean" else f", {v}"
            which = ("accuracy", "macro-F1", "R@90%P") if v == "clean" else ("accuracy",)
            class_scores(res, labels[judge, a], out[f"{v}/{h}"].cpu(), pre, post, which)
            if f"{v}/lambda/{h}" in out:
                res["lambda_image_weight"].setdefault(h, {})[v] = out[f"{v}/lambda/{h}"].mean().item()
    res["mu_keys"] = ["accuracy", "macro-F1"] if task == "scr" else [f"{h} accuracy" for h in heads]
    what = "sub-category of fused image + text" if task == "scr" else "CMA-CLIP heads"
    skipped = int((labels < 0).any(1).sum())
    res["protocol"] = (f"{task.upper()}: {what}, {n} val images ({skipped} labelled -1 skipped); "
                       f"macro-F1 over the classes in labels or predictions (sklearn 'macro'); "
                       f"noisy modality: texts / images shuffled; chance = the majority class; "
                       f"mu = mean({', '.join(res['mu_keys'])})")
    return res


def zero_shot(m, ds, tok, img, task, args):
    """FashionCLIP-style, no trained head: each val image's nearest prompt "a photo of {sub-category}"."""
    names = ds.labels["subcategory"]
    prompts = tok([f"a photo of {n.lower()}" for n in names])
    cls = encode(m, [{"text": t} for t in prompts], "text", task, args, "prompts")  # (C, E)
    res = dict(task="zeroshot", metrics={}, chance={},
               protocol=f"zero-shot recognition: val images vs {len(names)} prompts 'a photo of "
                        f"<sub-category>', cosine argmax, contrastive mode with the {task} TSA; "
                        f"chance = the majority class")
    pred = F.one_hot(zero_shot_predict(img, cls), len(names)).float().cpu()  # (I, C)
    class_scores(res, ds.attrs[ds.image_product, 1], pred, which=("accuracy", "macro-F1"))
    return res


def fic(m, ds, cfg, args):
    """FIC (Table 3): caption the first N val images from SOT (greedy or beam) up to the text context;
    reference = the product text. Chance = a random OTHER product's text as the caption."""
    n = min(args.fic_limit or len(ds), len(ds))
    L = cfg["context_length"] - 1  # SOT + L tokens fill the context

    def step(b, _):
        ids = m.generate(b["image"], L, args.beam, "fic")  # (B, 1 + n<=L)
        return {"ids": F.pad(ids, (0, L + 1 - ids.shape[1]))}  # batches are concatenated: pad to 1 + L
    ids = batches(torch.utils.data.Subset(ds, range(n)), step, args, "FIC")["ids"].cpu()
    owner, P = ds.image_product[:n].numpy(), len(ds.texts)
    refs, hyps = {i: [ds.texts[p]] for i, p in enumerate(owner)}, {i: decode(t) for i, t in enumerate(ids)}
    other = (owner + np.random.default_rng(0).integers(1, P, n)) % P  # a random other product per image
    other_texts = {i: ds.texts[p] for i, p in enumerate(other)}
    with ThreadPoolExecutor(2) as ex:  # two independent scorings: their JVM start-ups (METEOR's ~9 s) overlap
        ours, rand = ex.map(lambda h: caption_scores(refs, h), (hyps, other_texts))
    keys = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    decoding = f"beam {args.beam}" if args.beam > 1 else "greedy"
    res = dict(task="fic", metrics={k: ours[k] for k in keys}, chance={k: rand[k] for k in keys},
               mu_keys=keys, n=n,
               examples=[{"caption": hyps[i], "truth": refs[i][0]} for i in range(min(n, 5))],
               protocol=f"FIC: first {n} of {len(ds)} val images, {decoding}, <= {L} tokens, reference = the "
                        f"product text, {ours['tokenizer']} tokenizer; chance = another product's text; "
                        f"mu = mean of the four")
    return res, (hyps, refs)


# ---- pictures (PIL only) ----
def thumb(path, size, T=128):
    """What the model sees (eval resize + centre crop), enlarged to T x T."""
    big = round(size * 256 / 224)
    o = round((big - size) / 2)
    img = data.load_image(path, path).resize((big, big), Image.BICUBIC)
    return img.crop((o, o, o + size, o + size)).resize((T, T))


def save_grid(rows, path, T=128, cols=6):
    """rows of (text lines, [(PIL image T x T, outline colour or None)]) -> one PNG, text above each row
    of images."""
    width = cols * (T + 8) // 6  # characters per text line: the default font is ~6 px wide
    rows = [([w for line in lines for w in textwrap.wrap(line, width)], ims) for lines, ims in rows]
    canvas = Image.new("RGB", (cols * (T + 8) + 8, sum(14 * len(t) + T + 14 for t, _ in rows) + 8), "white")
    d, y, font = ImageDraw.Draw(canvas), 8, ImageFont.load_default()
    for lines, ims in rows:
        for line in lines:
            d.text((8, y), line, fill="black", font=font)
            y += 14
        for x, (im, colour) in zip(range(8, canvas.width, T + 8), ims):
            canvas.paste(im, (x, y + 3))
            if colour:
                d.rectangle([x - 3, y, x + T + 2, y + T + 5], outline=colour, width=3)
        y += T + 14
    canvas.save(path)
    return path


def pictures(m, out_dir, keep, ds, tok, size, args, n=3):
    """XMR top-5 for a few texts (the true product's images green), TGIR top-5 (reference blue, target
    green), captions with their ground truth, and the last text-side XAA's text-to-image attention over
    SCR inputs (the supplement's Fig. 4: the EOT query's head-averaged row over the image patches)."""
    def pic(i):  # val image i of the product dataset
        rec = ds.products[ds.image_product[i]]
        return thumb(os.path.join(ds.dir, rec["images"][ds.image_view[i]]), size)
    def fiq(d, asin):  # a FashionIQ image of dataset d
        return thumb(os.path.join(d.dir, "images", d.files.get(asin, asin + ".jpg")), size)
    def top5(q, g):  # (E,), (G, E) -> indices of the 5 best gallery items
        return (q @ g.T).topk(min(5, len(g))).indices.tolist()
    grids = {}
    if "xmr" in keep:
        img, txt = keep["xmr"]
        grids["xmr_top5"] = rows = []
        for p in range(min(n, len(txt))):  # the first product texts as queries
            hits = [(pic(i), "green" if ds.image_product[i] == p else None) for i in top5(txt[p], img)]
            rows.append(([f"query: {ds.texts[p]}"], hits))
    if "tgir" in keep:
        tds, q, gal = keep["tgir"]
        grids["tgir_top5"] = rows = []
        for j, (c, t, target) in enumerate(tds.triplets):
            cat = tds.categories[c]
            if cat in gal and len(rows) < n:
                g, gf = gal[cat]
                ims = [(fiq(tds, t["candidate"]), "blue")]
                ims += [(fiq(g, g.asins[i]), "green" if i == target else None) for i in top5(q["f"][j], gf)]
                rows.append(([f"{cat}: {tds.join.join(t['captions'])}"], ims))
    if "fic" in keep:
        hyps, refs = keep["fic"]
        grids["fic_captions"] = [([f"caption: {hyps[i]}", f"truth: {refs[i][0]}"], [(pic(i), None)])
                                 for i in list(hyps)[:2 * n]]
    if "scr" in keep and "text" in m.xaa:
        seen, xaa, idx = [], m.xaa["text"][-1], range(min(2 * n, len(ds)))
        # a hook catches the XAA's inputs: (text h, vision keys / values)
        hook = xaa.register_forward_hook(lambda mod, inputs, o: seen.append(inputs))
        tokens = tok([ds.texts[ds.image_product[i]] for i in idx]).to(args.device)  # (B, L)
        with torch.no_grad():
            m.fuse(torch.stack([ds[i]["image"] for i in idx]).to(args.device), tokens, "scr")
            # the EOT row (EOT has the largest token id), without the CLS column
            att = xaa.attention_map(*seen[0])[torch.arange(len(idx)), tokens.argmax(-1), 1:]  # (B, P)
        hook.remove()
        lo, hi = att.amin(1, keepdim=True), att.amax(1, keepdim=True)
        att = (att - lo) / (hi - lo + 1e-12)  # each map to [0, 1]
        maps = att.view(len(idx), math.isqrt(att.shape[1]), -1).float().cpu().numpy()  # (B, g, g): patch grid

        def heat(a):  # (g, g) in [0, 1] -> a 128 x 128 colour map, blue (low) to red (high)
            grey = Image.fromarray(np.uint8(255 * a)).resize((128, 128), Image.BILINEAR)
            return ImageOps.colorize(grey, "blue", "red", mid="yellow")
        grids["scr_attention"] = [([f"SCR input: {ds.texts[ds.image_product[i]]}"],
                                   [(pic(i), None), (Image.blend(pic(i), heat(a), 0.5), None)])
                                  for i, a in zip(idx, maps)]
    os.makedirs(out_dir, exist_ok=True)
    return [save_grid(rows, os.path.join(out_dir, f"{name}.png")) for name, rows in grids.items() if rows]


# ---- the report ----
def evaluate(path, args):
    m, cfg, tok, size = load_checkpoint(path, args.device)
    args.data = args.data or cfg["data"]
    # "all": the model's tasks + zero-shot, in the order of PROTOCOLS
    want = ([t for t in PROTOCOLS if t in m.tasks or t == "zeroshot"] if args.tasks == "all"
            else args.tasks.split(","))
    if set(want) - set(PROTOCOLS):
        raise ValueError(f"unknown protocol(s) {sorted(set(want) - set(PROTOCOLS))}; known: {PROTOCOLS}")
    full_size = not cfg.get("toy") and not cfg.get("clip_config")  # not toy data, nor a tiny custom CLIP
    note = "" if full_size else "; not a full-size run: chance levels, no paper figures"
    print(f"evaluating {path} (step {cfg['step']}, tasks {list(m.tasks)}) on {args.data} val, "
          f"device {args.device}{note}")
    ds = data.ProductDataset(args.data, "val", tok, size, train=False) if set(want) - {"tgir"} else None
    results, keep, feats = {}, {}, {}  # feats: val image features per task, shared by XMR and zero-shot

    def img(t):  # encoded once per task
        if t not in feats:
            feats[t] = encode(m, ds, "image", t, args, f"{t} images")
        return feats[t]

    for t in want:
        t0, new = time.time(), {}
        if t not in m.tasks and t != "zeroshot":
            print(f"\n{t}: skipped, the model has no such task")
        elif t == "xmr":
            texts = [{"text": x} for x in tok(ds.texts)]  # (L,) token ids per product
            keep["xmr"] = img("xmr"), encode(m, texts, "text", "xmr", args, "XMR texts")  # (I, E), (P, E)
            new["xmr_full"], new["xmr_random100"] = xmr(*keep["xmr"], ds)
        elif t == "tgir":
            new["tgir"], keep["tgir"] = tgir(m, tok, size, cfg, args)
        elif t in ("scr", "cma"):
            new[t] = keep[t] = classify(m, ds, tok, args, t)
        elif t == "zeroshot":
            task = contrastive_task(m)
            new[t] = zero_shot(m, ds, tok, img(task), task, args)
        else:
            new["fic"], keep["fic"] = fic(m, ds, cfg, args)
        for key, r in new.items():  # print each protocol as soon as it is done
            if full_size and key in PAPER:
                r["paper"] = PAPER[key]
            r["seconds"] = round(time.time() - t0, 1)
            print(f"\n{r['protocol']} [{r['seconds']} s]")
            for k, v in r["metrics"].items():
                c, p, s = (r.get(d, {}).get(k) for d in ("chance", "paper", "std"))
                line = f"  {k:<36}" + ("   n/a" if v is None else f"{v:6.2f}")
                line += f" ± {s:5.2f}" if s is not None else ""
                line += f"   chance {c:6.2f}" if c is not None else ""
                line += f"   paper {p:6.2f}" if p is not None else ""
                print(line)
            for h, lam in r.get("lambda_image_weight", {}).items():
                print(f"  mean lambda (image weight) {h}: "
                      + ", ".join(f"{v} {x:.3f}" for v, x in lam.items()))
        results.update(new)
    # mu per task (Sec. 4), beside the same mean over the chance levels and over the paper's figures
    mu = {r["task"]: {w: mean(r.get(w, {}).get(k) for k in r["mu_keys"])
                      for w in ("metrics", "chance", "paper")}
          for r in results.values() if "mu_keys" in r}
    stl = {}  # task -> mu of a single-task baseline, for Delta
    for s in filter(None, args.stl.split(",") if mu else []):
        print(f"\n---- single-task baseline {s} ----")
        sub_args = argparse.Namespace(**{**vars(args), "stl": "", "pictures": "", "tasks": ",".join(mu)})
        sub = evaluate(s, sub_args)
        stl.update({t: v["metrics"] for t, v in sub["summary"]["mu"].items() if t in mu})
    for t, v in mu.items():
        v.update(stl=stl.get(t), delta=(v["metrics"] - stl[t]) / stl[t] if stl.get(t) else None)
    params = param_table(m)
    print("\nSummary: mu = mean of a task's headline metrics, Delta = (mu - mu_STL) / mu_STL "
          "(the paper's Sec. 4)\n"
          f"  {'task':<8} {'mu':>7} {'chance':>7} {'paper':>7} {'mu_STL':>7} {'Delta':>8}")

    def cell(x, pct=False):
        if x is None:
            return f"{'-':>7}"
        return f"{100 * x:+7.2f}%" if pct else f"{x:7.2f}"
    for t, v in mu.items():
        print(f"  {t:<8} " + " ".join(cell(v[w]) for w in ("metrics", "chance", "paper", "stl"))
              + f" {cell(v['delta'], True)}")
    heads = ", ".join(f"{t} {n:,}" for t, n in params["heads"].items())
    print(f"  parameters: CLIP {params['clip']:,}, TSA per task {params['tsa_per_task']:,}, "
          f"XAA {params['xaa']:,}, heads {heads}; total {params['total']:,}; "
          f"saving vs one single-task model per task {100 * params['saving']:.1f} %")
    results = dict(checkpoint=path, step=cfg["step"], data=args.data, full_size=full_size, **results,
                   summary=dict(mu=mu, params=params))
    if args.pictures:
        results["pictures"] = pictures(m, args.pictures, keep, ds, tok, size, args)
        print("pictures: " + ", ".join(results["pictures"]))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    options = [  # flag, default (its type is the option's type), help
        ("--tasks", "all", f"all (the model's tasks + zeroshot) or a comma list of {', '.join(PROTOCOLS)}"),
        ("--json", "", "write the results here"),
        ("--pictures", "", "write PNG grids into this directory"),
        ("--stl", "", "single-task checkpoints (comma list): Delta of mu against theirs"),
        ("--beam", 1, "FIC beam size (1 = greedy)"),
        ("--fic_limit", 0, "caption only the first N images (0 = all)"),
        ("--data", "", "prepared data root (default: the checkpoint's)"),
        ("--batch_size", 64, ""),
        ("--device", "cuda" if torch.cuda.is_available() else "cpu", ""),
        ("--workers", 2, "DataLoader workers")]
    for flag, default, help in options:
        p.add_argument(flag, type=type(default), default=default, help=help)
    args = p.parse_args(argv)
    results = evaluate(args.ckpt, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
