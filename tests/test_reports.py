"""Evaluation's user-facing outputs, by value: the decoded captions and the chance levels printed beside each metric.

Chance levels drawn from pairs must never draw the true pair. In protocols.py only captioning draws pairs (a random
other product's text as the caption); every other chance level is either analytic (retrieval full and random-100,
TGIR: metrics.chance_at from the candidate counts) or the majority class (zero-shot, SCR, CMA-CLIP:
class_scores), so there is no pair to check. (The noisy-modality shuffles of classification are metrics, not chance
levels, and keep an item's own text by chance as their docstring says.)
"""
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch

import protocols

SOT, EOT = 49406, 49407
BPE = open_clip.tokenizer._tokenizer
KEYS = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


# ----------------------------------------------------------------------------- decoded captions
def between(ids):  # the ids strictly between SOT (first) and the first EOT, or to the end without one
    ids = ids[1:]
    return ids[:ids.index(EOT)] if EOT in ids else ids


WORDS = BPE.encode("a red dress with white dots")
ROWS = {
    "padding after EOT": [SOT, *WORDS, EOT, 0, 0, 0],
    "no EOT at all": [SOT, *WORDS],
    "EOT at once": [SOT, EOT, 0, 0, 0],
    "tokens after EOT": [SOT, *WORDS[:2], EOT, *WORDS[2:], EOT, SOT],  # e.g. a finished beam's history: ignored
}


@pytest.mark.parametrize("case", list(ROWS))
def test_decoded_caption_is_open_clip_decode_of_the_ids_between_sot_and_eot(case):
    ids = ROWS[case]
    text = protocols.decode(torch.tensor(ids))
    assert text == BPE.decode(between(ids)).strip()
    assert "<start_of_text>" not in text and "<end_of_text>" not in text and "</w>" not in text
    expected = {"padding after EOT": "a red dress with white dots", "no EOT at all": "a red dress with white dots",
                "EOT at once": "", "tokens after EOT": "a red"}
    assert text == expected[case]


def test_decoded_caption_keeps_token_zero_before_eot():
    ids = [SOT, *BPE.encode('wow !"!'), EOT, 0]  # '!"!' is tokenized as [0, 10377]
    assert 0 in between(ids)
    assert protocols.decode(torch.tensor(ids)) == BPE.decode(between(ids)).strip() == 'wow !"!'


# ----------------------------------------------------------------------------- captioning's chance level
class Items(list):  # what captioning reads of a ProductDataset: its items and a few attributes
    pass


def fake_caption_run(monkeypatch, texts, owner, caption_limit=0):
    """protocols.captioning on a fake val set (image i is product owner[i], its "image" the product number) and a
    perfect fake captioner (it returns its product's text). caption_scores is replaced by exact-match scoring
    (100 x the share of hypotheses equal to their reference) that records its inputs."""
    val = Items({"image": torch.tensor([float(p)])} for p in owner)
    val.texts, val.image_product = texts, torch.tensor(owner)
    ids = [torch.tensor([SOT, *BPE.encode(t), EOT]) for t in texts]

    def generate(images, task, max_len, beam):  # (B, 1) -> (B, 1 + n): zero-padded, like FAMEViL.generate
        rows = [ids[int(p)] for p in images[:, 0]]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    fake = SimpleNamespace(context_length=16, generate=generate)
    calls = []

    def scores(refs, *hyp_sets):  # the model's captions, then the chance captions, against the same refs
        calls.append((refs, hyp_sets))
        return [{**{k: 100.0 * float(np.mean([h[i] == refs[i][0] for i in refs])) for k in KEYS},
                 "tokenizer": "exact"} for h in hyp_sets]
    monkeypatch.setattr(protocols, "caption_scores", scores)
    opts = SimpleNamespace(device="cpu", batch_size=8, workers=0, beam=1, caption_limit=caption_limit, pictures=False)
    res = protocols.captioning(fake, "fic", None, val, opts)["fic"]
    assert len(calls) == 1 and len(calls[0][1]) == 2  # one scoring call: one tokenizer JVM for both sets
    refs, (ours, chance) = calls[0]
    return res, (refs, ours), (refs, chance)


def test_caption_chance_never_scores_the_true_pair(monkeypatch):
    texts = ["red dress with white dots", "navy shirt", "black leather ankle boots"]
    owner = [0, 1, 2] * 12  # 36 images of 3 products: a draw over all products would hit the true one ~12 times
    res, (refs, hyps), (chance_refs, chance_hyps) = fake_caption_run(monkeypatch, texts, owner, caption_limit=30)
    assert res["n"] == 30 and refs == chance_refs == {i: [texts[owner[i]]] for i in range(30)}
    assert hyps == {i: texts[owner[i]] for i in range(30)}  # the perfect captioner's decoded captions
    for i, text in chance_hyps.items():
        assert text in texts and text != texts[owner[i]], i  # another product's text, never the image's own
    drawn = {(owner[i], texts.index(t)) for i, t in chance_hyps.items()}
    assert drawn == {(p, q) for p in range(3) for q in range(3) if p != q}  # random: every other product occurs
    assert res["metrics"] == {k: 100.0 for k in KEYS}
    assert res["chance"] == {k: 0.0 for k in KEYS}  # one true pair drawn would make it > 0


def test_caption_chance_never_scores_the_true_text_even_when_products_share_it(monkeypatch):
    texts = ["navy shirt", "navy shirt", "red dress with white dots"]
    _, _, (refs, chance_hyps) = fake_caption_run(monkeypatch, texts, [0, 1, 2] * 10)
    assert all(chance_hyps[i] != refs[i][0] for i in refs)
