import math
import shutil

import numpy as np
import pytest
import torch

from metrics import (accuracy, caption_scores, chance_at, macro_f1, random100_candidates, recall_at_k,
                      recall_at_precision, recall_random100, zero_shot_predict)

java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB/METEOR need Java")


def brute_recall(q, g, qid, gid, ks, ties_against=True):
    # pure-Python reference: rank = #negatives with sim >= best positive sim (> if ties_against=False)
    hits = {k: 0 for k in ks}
    for qi, a in zip(qid, q):
        sims = [sum(x * y for x, y in zip(a, b)) for b in g]
        best = max(s for s, i in zip(sims, gid) if i == qi)
        rank = sum(s > best or (ties_against and s == best) for s, i in zip(sims, gid) if i != qi)
        for k in ks:
            hits[k] += rank < k
    return {k: 100.0 * hits[k] / len(q) for k in ks}


def int_feats(n, d, gen):
    # small integers / 4: every dot product is exact in float32 in any summation order, so ties are
    # exact and chunked vs unchunked matmuls cannot differ by rounding
    return torch.randint(-2, 3, (n, d), generator=gen).float() / 4


def test_recall_at_k_tiny_tie():
    # the positive and a negative score the same: the tie counts against the query
    q, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert recall_at_k(q, g, [7], [7, 8, 9], ks=(1, 2)) == {1: 0.0, 2: 100.0}


@pytest.mark.parametrize("per_id", [1, 3])  # 1: one gallery item per id (I->T); 3: product-level T->I
def test_recall_at_k_matches_brute_force(per_id):
    gen = torch.Generator().manual_seed(per_id)
    n_ids, d, ks = 40, 4, (1, 5, 10)
    gid = torch.arange(n_ids).repeat_interleave(per_id)[torch.randperm(n_ids * per_id, generator=gen)]
    g = int_feats(len(gid), d, gen)
    g[1::5] = g[0::5][: len(g[1::5])]                        # duplicated rows -> exact ties across ids
    qid = torch.randint(0, n_ids, (57,), generator=gen)
    first_pos = torch.stack([(gid == i).nonzero()[0, 0] for i in qid])  # (Q,)
    q = g[first_pos] + torch.randint(-1, 2, (57, d), generator=gen).float() / 4  # noisy match
    ref = brute_recall(q.tolist(), g.tolist(), qid.tolist(), gid.tolist(), ks)
    assert 0 < ref[1] < ref[10] < 100                        # a case where ranks actually vary
    assert ref != brute_recall(q.tolist(), g.tolist(), qid.tolist(), gid.tolist(), ks, ties_against=False)
    for chunk in (1, 7, 10_000):
        assert recall_at_k(q, g, qid, gid, ks, chunk=chunk) == ref


def test_recall_at_k_missing_positive():
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(torch.eye(2), torch.eye(2), [0, 5], [0, 1])


def catalogue():
    # sub-categories A, B with >= 100 products each, C with 30 (I->T negatives must be filled)
    gen = np.random.default_rng(0)
    prod_group = np.array(["A"] * 150 + ["B"] * 120 + ["C"] * 30)           # (P,)
    img_owner = np.repeat(np.arange(len(prod_group)), gen.integers(1, 4, len(prod_group)))  # (N,)
    torch.manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(len(prod_group), 16), dim=-1)
    img = torch.nn.functional.normalize(txt[img_owner] + 0.7 * torch.randn(len(img_owner), 16), dim=-1)
    return prod_group, img_owner, txt, img


def test_random100_candidate_sets():
    prod_group, img_owner, _, _ = catalogue()
    txt_owner = np.arange(len(prod_group))
    rng, n_filled = np.random.default_rng(0), 0
    for pos in img_owner:                                  # I->T: positive = the image's product text
        idx, filled = random100_candidates(pos, prod_group, txt_owner, rng)
        neg = idx[1:]
        assert len(idx) == 101 and idx[0] == pos and (idx == pos).sum() == 1
        assert len(set(neg.tolist())) == 100 and (txt_owner[neg] != pos).all()
        same = prod_group[neg] == prod_group[pos]
        assert filled == (prod_group[pos] == "C")
        if filled:                                         # all 29 same-group negatives + 71 others
            n_filled += 1
            assert same.sum() == 29
        else:
            assert same.all()
    assert n_filled == (prod_group[img_owner] == "C").sum() > 0


def test_recall_random100_seeded_and_std():
    prod_group, img_owner, txt, img = catalogue()
    txt_owner, draws, n_q = np.arange(len(prod_group)), 3, 200
    i2t = dict(queries=img, cands=txt, query_pos=img_owner, cand_group=prod_group, cand_owner=txt_owner,
               n_queries=n_q, draws=draws)
    r, n_filled = recall_random100(**i2t, seed=3)
    assert recall_random100(**i2t, seed=3) == (r, n_filled)
    assert recall_random100(**i2t, seed=4)[0] != r
    # replay the documented protocol (draw d uses default_rng([seed, d])) by brute force
    per_draw, filled = {k: [] for k in (1, 5, 10)}, 0
    for d in range(draws):
        rng = np.random.default_rng([3, d])
        ranks = []
        for qi in rng.choice(len(img), n_q, replace=False):
            idx, f = random100_candidates(img_owner[qi], prod_group, txt_owner, rng)
            filled += f
            s = [float(txt[j] @ img[qi]) for j in idx]
            ranks.append(sum(x >= s[0] for x in s[1:]))
        for k in per_draw:
            per_draw[k].append(100 * sum(rk < k for rk in ranks) / n_q)
    assert n_filled == filled > 0
    for k, v in per_draw.items():
        assert r[k][0] == pytest.approx(np.mean(v)) and r[k][1] == pytest.approx(np.std(v))
        assert r[k][1] > 0                                 # the draws really differ
    assert 5 < r[1][0] < r[10][0] < 100                    # correlated features: far above chance (~1 %)
    # every candidate scores the same: all 100 negatives tie the positive and count against it
    flat = torch.ones(len(prod_group), 16) / 4
    tied, _ = recall_random100(img, flat, img_owner, prod_group, txt_owner, n_queries=20, draws=1)
    assert tied == {1: (0.0, 0.0), 5: (0.0, 0.0), 10: (0.0, 0.0)}
    # T->I: queries = product texts, positive = one seeded-random view of each product
    rng = np.random.default_rng(0)
    one_view = np.array([rng.choice(np.flatnonzero(img_owner == p)) for p in range(len(prod_group))])
    t2i, t2i_filled = recall_random100(txt, img, one_view, prod_group[img_owner], img_owner, draws=2)
    assert t2i_filled == 2 * 30                            # 300 texts/draw; C: < 100 other-product images
    assert 5 < t2i[1][0] < t2i[10][0] < 100


def test_accuracy_and_macro_f1():
    y_true = [0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 3, 1, 0, 2, 1]
    # accuracy: positions 0, 1, 3, 5 correct -> 4/7 = 57.142857 %
    # F1_c = 2TP / (2TP + FP + FN) over classes {0, 1, 2, 3} (3 is only predicted):
    #   0: TP 2, FP 1 (pos 4), FN 1 (pos 2) -> 4/6;  1: TP 1, FP 1 (pos 6), FN 1 (pos 4) -> 2/4
    #   2: TP 1, FP 0, FN 1 (pos 6) -> 2/3;          3: TP 0, FP 1 -> 0
    # macro = (2/3 + 1/2 + 2/3 + 0) / 4 = 11/24 = 45.8333 %
    assert accuracy(y_true, y_pred) == pytest.approx(400 / 7)
    assert macro_f1(y_true, y_pred) == pytest.approx(1100 / 24)
    assert macro_f1(torch.tensor(y_true), torch.tensor(y_pred)) == pytest.approx(1100 / 24)
    assert macro_f1([1, 2, 2], [1, 2, 2]) == accuracy([1, 2, 2], [1, 2, 2]) == 100.0


def test_recall_at_precision_with_ties():
    # (max prob, correct?) sorted by confidence; rows 2 and 3 tie at 0.8, the second one wrong:
    #   t=0.9: 1/1 kept correct, precision 1.00, recall 1/6
    #   t=0.8: 2/3 -> 0.667, recall 2/6  (splitting the tie would claim 2/2 = 1.0, recall 2/6)
    #   t=0.7: 3/4 -> 0.75,  recall 3/6
    #   t=0.6: 4/5 -> 0.80,  recall 4/6
    #   t=0.5: 4/6 -> 0.667, recall 4/6
    probs = torch.tensor([[0.9, 0.05, 0.05],   # label 0 correct
                          [0.1, 0.8, 0.1],     # label 1 correct
                          [0.8, 0.1, 0.1],     # label 2 wrong (tie with the row above)
                          [0.15, 0.15, 0.7],   # label 2 correct
                          [0.6, 0.3, 0.1],     # label 0 correct
                          [0.25, 0.25, 0.5]])  # label 0 wrong
    labels = torch.tensor([0, 1, 2, 2, 0, 0])
    assert recall_at_precision(probs, labels, 0.9) == pytest.approx(100 / 6)   # not 200/6: ties are whole
    assert recall_at_precision(probs, labels, 0.8) == pytest.approx(400 / 6)   # 4/5 >= 0.8 exactly
    assert recall_at_precision(probs, labels, 0.75) == pytest.approx(400 / 6)
    assert recall_at_precision(probs, labels, 1.01) == 0.0
    perm = torch.tensor([5, 2, 4, 1, 0, 3])                     # the order within a tie must not matter
    assert recall_at_precision(probs[perm], labels[perm], 0.9) == pytest.approx(100 / 6)


def test_zero_shot_predict():
    classes = torch.tensor([[10.0, 0.0], [0.0, 1.0]])     # unnormalised: argmax must use the cosine
    images = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.1, -1.0]])
    assert zero_shot_predict(images, classes).tolist() == [1, 0, 0]


REFS = {1: ["Long sleeve shirt in navy. Striped pattern. Button closure."],
        2: ["Slim-fit jeans in black denim, five-pocket styling.", "Black skinny jeans."],
        3: ["Short sleeveless dress in red; polka-dot pattern."]}
HYPS = {1: "long sleeve shirt in navy . striped pattern .",
        2: "Slim-fit jeans in blue denim.",
        3: "Short dress in red with dots!"}


@pytest.mark.slow
@java
def test_caption_scores_equal_pycocoevalcap(monkeypatch):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from metrics import meteor_scorer
    # METEOR's JVM takes ~9 s to load its paraphrase table on 2 cores: caption_scores and the direct call
    # share the one scorer of this process (scoring is stateless per call)
    meteor = meteor_scorer()
    ours = caption_scores(REFS, HYPS)[0]
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in r] for i, r in REFS.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in HYPS.items()})
    direct = {"BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
              "METEOR": meteor.compute_score(gts, res)[0], "ROUGE-L": Rouge().compute_score(gts, res)[0],
              "CIDEr": Cider().compute_score(gts, res)[0]}
    assert ours["tokenizer"] == "ptb"
    for k, v in direct.items():
        assert ours[k] == pytest.approx(100 * v, rel=1e-12) and ours[k] > 0
    # several hypothesis sets in one call (one tokenizer JVM, as captioning scores its chance level) score as alone
    other = {i: REFS[i][-1] for i in HYPS}
    assert caption_scores(REFS, HYPS, other) == [ours, caption_scores(REFS, other)[0]]
    # on these captions the fallback tokenizer splits exactly as PTB does, so BLEU/ROUGE/CIDEr agree
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    fallback = caption_scores(REFS, HYPS)[0]
    for k in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert fallback[k] == pytest.approx(ours[k], rel=1e-12)


def test_caption_scores_fallback(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    out = caption_scores(REFS, HYPS)[0]
    assert "java not found" in capsys.readouterr().out
    assert out["tokenizer"] == "fallback" and out["METEOR"] is None
    for k in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert math.isfinite(out[k]) and out[k] > 0
    other = {i: REFS[i][-1] for i in HYPS}
    assert caption_scores(REFS, HYPS, other) == [out, caption_scores(REFS, other)[0]]
    same = caption_scores({0: ["A red shirt, with dots."]}, {0: "a red shirt with dots"})[0]
    assert same["BLEU-4"] == pytest.approx(100, abs=1e-4) and same["ROUGE-L"] == pytest.approx(100)


def test_chance_at_is_drawing_without_replacement():
    # R@K of a random ranking: 1 - C(n - n_pos, K) / C(n, K), written with math.comb
    def hyper(k, n_pos, n):
        return 100 * (1 - math.comb(n - n_pos, min(k, n)) / math.comb(n, min(k, n)))
    assert chance_at(1, 1, 10) == pytest.approx(10.0)
    assert chance_at(2, 1, 10) == pytest.approx(20.0)  # with replacement it would be 19 %
    for k, n_pos, n in [(5, 2, 10), (10, 3, 101), (3, 1, 3), (20, 1, 10)]:
        assert chance_at(k, n_pos, n) == pytest.approx(hyper(k, n_pos, n)), (k, n_pos, n)
    # per-query positives (T->I: a product's views): the mean over queries
    assert chance_at(2, np.array([1, 2]), 4) == pytest.approx((hyper(2, 1, 4) + hyper(2, 2, 4)) / 2)
