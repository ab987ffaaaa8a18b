"""
Evaluation metrics: pure functions of features, predictions or captions, no model and no I/O.

Percentages are 0-100 floats, as the papers print them. Ties always count against the query. Each
function is checked against brute force or hand-computed cases in tests/test_metrics.py.
"""
import functools
import re
import shutil

import numpy as np
import torch
import torch.nn.functional as F


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
    (draw, query) pairs that needed negatives from other sub-categories.
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


@functools.cache
def meteor_scorer():  # one METEOR JVM per process (thread-safe: it holds a lock), reused by every evaluation
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def caption_scores(refs, *hyp_sets):
    """{id: [ref str, ...]}, then one or more {id: hyp str} -> per hypothesis set, in order: BLEU-4, METEOR,
    ROUGE-L, CIDEr (x100) via pycocoevalcap.

    CIDEr's IDF comes from the evaluated references (coco-caption's behaviour). Without Java: the
    fallback tokenizer above and METEOR = None, with a warning.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    assert all(refs.keys() == hyps.keys() for hyps in hyp_sets), "refs and hyps must cover the same ids"
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        meteor = meteor_scorer()  # the first call starts its JVM: its ~9 s start overlaps the work below
        # refs and every hypothesis set go through ONE tokenizer call: each call spawns a JVM
        tok = PTBTokenizer().tokenize({**{("r", i): [{"caption": c} for c in refs[i]] for i in refs},
                                       **{(s, i): [{"caption": h[i]}] for s, h in enumerate(hyp_sets) for i in h}})
        gts, sets = {i: tok[("r", i)] for i in refs}, [{i: tok[(s, i)] for i in h} for s, h in enumerate(hyp_sets)]
    else:
        print("warning: java not found: regex tokenizer instead of PTB, METEOR skipped")
        gts = {i: [_fallback_tokenize(c) for c in refs[i]] for i in refs}
        sets = [{i: [_fallback_tokenize(h[i])] for i in h} for h in hyp_sets]
    out = []
    for res in sets:
        scores = {"BLEU-4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3],
                  "METEOR": 100 * meteor.compute_score(gts, res)[0] if java else None,
                  "ROUGE-L": 100 * Rouge().compute_score(gts, res)[0],
                  "CIDEr": 100 * Cider().compute_score(gts, res)[0]}
        out.append({**{k: None if v is None else float(v) for k, v in scores.items()},
                    "tokenizer": "ptb" if java else "fallback"})
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


def chance_at(k, n_pos, n):
    """R@K (%) of a random ranking of n candidates, n_pos of them positive (per query: an array)."""
    # P(miss) = P(none of the first min(k, n) draws without replacement is a positive)
    miss = np.prod([np.clip((n - np.asarray(n_pos) - i) / (n - i), 0, 1) for i in range(min(k, n))], axis=0)
    return float(100 * np.mean(1 - miss))


def mean(xs):
    xs = [x for x in xs if x is not None]  # METEOR is None without Java
    return float(np.mean(xs)) if xs else None
