"""evaluate.py end to end on a tiny checkpoint, the encode-once guarantee, the noisy-modality bookkeeping, sample.py."""
import collections
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import model
import protocols
import sample
import toy
import train
from conftest import TINY

CLIP = json.dumps({**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 48}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a tiny model gains nothing from a second thread, and on a shared 2-core machine it loses ~10x to contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, toy):
    """The four FAME-ViL tasks + CMA-CLIP's head, modality-wise fusion, a few steps on a small ToyFashion."""
    root = tmp_path_factory.mktemp("evaluate")
    train.main(["--data", toy, "--out_dir", str(root / "run"), "--clip_config", CLIP, "--pretrained", "",
                "--context_length", "48", "--bottleneck", "8", "--batch_size", "8", "--task", "xmr,tgir,scr,fic,cma",
                "--fusion", "modality", "--max_iters", "6", "--warmup_iters", "2", "--num_workers", "0",
                "--log_interval", "100", "--eval_interval", "1000", "--eval_batches", "1"])
    return str(root / "run" / "ckpt.pt"), toy


@pytest.mark.slow
def test_end_to_end_json_and_pictures(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = evaluate.main([path, "--json", str(tmp_path / "r.json"), "--pictures", str(tmp_path / "pics"),
                         "--caption_limit", "4", "--batch_size", "32", "--workers", "0"])
    printed = capsys.readouterr().out
    with open(tmp_path / "r.json") as f:
        r = json.load(f)
    assert r == json.loads(json.dumps(out))  # main returns what it writes
    for key in ("xmr_full", "xmr_random100", "xmr_zeroshot", "tgir", "scr", "fic", "cma"):
        assert r[key]["protocol"] in printed and r[key]["task"] == key.split("_")[0], key
        assert r[key]["metrics"] and r[key]["metrics"].keys() <= r[key]["chance"].keys(), key
        assert all(v is None or 0 <= v <= 100 for v in r[key]["metrics"].values()), key
    assert set(r["xmr_full"]["metrics"]) == set(protocols.RECALL_KEYS) | {"mean"}
    assert set(r["xmr_random100"]["std"]) == set(protocols.RECALL_KEYS) and r["xmr_random100"]["n_neg"] > 0
    assert r["xmr_random100"]["mu"] == protocols.RECALL_KEYS and "mu" not in r["xmr_full"]
    assert any(k.endswith("R@10") for k in r["tgir"]["metrics"]) and "mean R@50" in r["tgir"]["metrics"]
    noisy = {"accuracy, texts shuffled", "accuracy, images shuffled"}
    assert {"accuracy", "macro-F1", *noisy} <= r["scr"]["metrics"].keys()
    assert set(r["xmr_zeroshot"]["metrics"]) == {"accuracy", "macro-F1"}
    assert set(r["scr"]["lambda_image_weight"]["scr"]) == {"clean", "texts shuffled", "images shuffled"}
    assert all(0 < v < 1 for v in r["scr"]["lambda_image_weight"]["scr"].values())
    assert r["fic"]["n"] == 4 and set(r["fic"]["metrics"]) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert {f"{a} accuracy, images shuffled" for a in toy.ATTRIBUTES} <= r["cma"]["metrics"].keys()
    assert set(r["cma"]["lambda_image_weight"]) == set(toy.ATTRIBUTES)  # one modality-wise attention each
    mu = r["summary"]["mu"]
    assert set(mu) == {"xmr", "tgir", "scr", "fic", "cma"} and r["summary"]["params"]["total"] > 0
    scr = r["scr"]
    assert mu["scr"]["metrics"] == pytest.approx((scr["metrics"]["accuracy"] + scr["metrics"]["macro-F1"]) / 2)
    assert mu["scr"]["chance"] == pytest.approx((scr["chance"]["accuracy"] + scr["chance"]["macro-F1"]) / 2)
    names = {os.path.basename(p) for p in r["pictures"]}
    assert names == {"xmr_top5.png", "tgir_top5.png", "scr_attention.png", "fic_captions.png"}
    assert all(Image.open(p).size[0] > 0 for p in r["pictures"])


def test_each_image_and_text_is_encoded_once(ckpt, monkeypatch):
    path, root = ckpt
    rows = collections.Counter()  # (method, task) -> rows encoded

    def counting(name):
        real = getattr(model.FAMEViL, name)

        def wrapper(self, x, task):
            rows[name, task] += len(x)
            return real(self, x, task)
        return wrapper
    for name in ("encode_image", "encode_text"):
        monkeypatch.setattr(model.FAMEViL, name, counting(name))
    evaluate.main([path, "--tasks", "xmr,tgir", "--batch_size", "16", "--workers", "0"])
    ds = data.open_dataset("products", root, "val", 48, 32, False, {"aug": "crop"})
    triplets = data.open_dataset("triplets", root, "val", 48, 32, False, {"aug": "crop"})
    cats = {triplets.categories[c] for c, _, _ in triplets.triplets}  # the categories with a val triplet
    gallery = sum(len(triplets.gallery(c)) for c in cats)
    assert rows == {("encode_image", "xmr"): len(ds),  # shared by retrieval and zero-shot
                    ("encode_text", "xmr"): len(ds.products) + ds.classes["subcategory"],  # texts + prompts
                    ("encode_image", "tgir"): gallery}  # each category's gallery once, not once per query


def test_delta_against_itself_is_zero(ckpt):
    path, _ = ckpt
    r = evaluate.main([path, "--tasks", "xmr", "--stl", path, "--workers", "0"])
    assert r["summary"]["mu"]["xmr"]["delta"] == 0.0


class Items(list):  # what the classification protocol reads of a ProductDataset: items and a few attributes
    pass


@pytest.mark.parametrize("reads", ["image", "text"])
def test_noisy_modality_bookkeeping(reads):
    # a fake classifier that reads the label off one modality: shuffling that modality must drop its accuracy to about
    # chance (1/C), shuffling the other must not change it at all
    n, C = 60, 4
    y = torch.arange(n) % C
    ds = Items({"image": y[i].float()[None]} for i in range(n))  # the "image" is its label
    ds.texts, ds.image_product, ds.attributes = [str(int(v)) for v in y], torch.arange(n), ["subcategory"]
    ds.class_attribute, ds.column = "subcategory", ds.attributes.index
    ds.attrs, ds.tokens = y[:, None], y[:, None]  # the "text" is its label too
    fake = SimpleNamespace(named_modules=lambda: [], xaa={})
    row = SimpleNamespace(head="subcategory", mode="fusion",
                          logits=lambda m, b, t: (F.one_hot(b[reads][:, 0].long(), C).float(),))
    opts = SimpleNamespace(device="cpu", batch_size=16, workers=0, pictures=False, noisy=True)
    r = protocols.classification(fake, "scr", row, ds, opts)["scr"]
    kept, lost = ("texts shuffled", "images shuffled")[::1 if reads == "image" else -1]
    assert r["metrics"]["accuracy"] == 100 and r["metrics"][f"accuracy, {kept}"] == 100
    assert r["metrics"][f"accuracy, {lost}"] < 50
    assert r["chance"]["accuracy"] == 25  # the majority class of a balanced 4-class set
    # --noisy false (table4.py): the clean pass alone, with the same clean figures
    clean = protocols.classification(fake, "scr", row, ds, SimpleNamespace(**{**vars(opts), "noisy": False}))["scr"]
    assert clean["metrics"] == {k: v for k, v in r["metrics"].items() if "shuffled" not in k}
    assert "noisy" not in clean["protocol"] and "noisy modality" in r["protocol"]


def test_sample_every_task(ckpt, capsys):
    path, root = ckpt
    images = os.path.join(root, "products", "images")
    image = os.path.join(images, "00000_0.png")
    assert sample.main([path, image, "--task", "fic"])[0].startswith("caption: ")
    lines = sample.main([path, image, "--task", "xmr", "--text", "a photo of a shirt|a photo of a dress|a bag"])
    assert lines[0] == "texts by cosine with the image:" and len(lines) == 4
    assert sample.main([path, image, "--task", "xmr", "--gallery", images])[0].startswith("gallery images")
    assert sample.main([path, image, "--task", "tgir", "--text", "is red", "--gallery", images])[1].endswith(".png")
    scr = sample.main([path, image, "--task", "scr", "--text", "Red striped shirt."])
    assert scr[0] == "class:" and len(scr) == 4  # the top 3 classes of the class attribute (sub-categories), by name
    assert any(name in line for line in scr for name in ("SHIRTS", "DRESSES", "SKIRTS", "TOPS", "PANTS", "BAGS",
                                                         "SHOES", "BOOTS", "SNEAKERS", "CLUTCHES"))
    cma = sample.main([path, image, "--task", "cma", "--text", "Red striped shirt."])
    assert [line for line in cma if not line.startswith(" ")] == [f"{a}:" for a in toy.ATTRIBUTES]
    with pytest.raises(ValueError, match="--task scr needs --text"):
        sample.main([path, image, "--task", "scr"])
    with pytest.raises(ValueError, match=r"--task \?: choose one of the checkpoint's tasks"):
        sample.main([path, image])


def hyper(k, n_pos, n):  # R@K (%) of a random ranking of n candidates with n_pos positives, by math.comb
    return 100 * (1 - math.comb(n - n_pos, min(k, n)) / math.comb(n, min(k, n)))


def test_retrieval_chance_levels_count_the_candidates():
    # T->I: every view of the text's product is a positive; random-100: the positive + n_neg candidates
    views = [1, 3, 1, 2, 1]
    owner = torch.arange(5).repeat_interleave(torch.tensor(views))  # (8,) each image's product
    g = torch.Generator().manual_seed(0)
    ds = Items({"image": torch.randn(4, generator=g)} for _ in owner)
    ds.texts, ds.image_product = [f"product {p}" for p in range(5)], owner
    ds.tokens = torch.randn(5, 4, generator=g)  # the products' "tokens": features, as the fake encodes them
    ds.products, ds.class_attribute = [{"labels": {"subcategory": "AB"[p % 2]}} for p in range(5)], "subcategory"
    fake = SimpleNamespace(encode_image=lambda x, task: x, encode_text=lambda x, task: x)
    opts = SimpleNamespace(device="cpu", batch_size=4, workers=0, pictures=False, memo={})
    r = protocols.retrieval(fake, "xmr", None, ds, opts)
    full, r100 = r["xmr_full"]["chance"], r["xmr_random100"]["chance"]
    assert r["xmr_random100"]["n_neg"] == 4
    for k in (1, 5, 10):
        assert full[f"I->T R@{k}"] == pytest.approx(hyper(k, 1, 5))
        assert full[f"T->I R@{k}"] == pytest.approx(np.mean([hyper(k, v, 8) for v in views]))
        assert r100[f"I->T R@{k}"] == r100[f"T->I R@{k}"] == pytest.approx(hyper(k, 1, 5))
    assert full["T->I R@1"] == pytest.approx(20.0)  # one positive per text would give 12.5


def test_tgir_mu_is_every_category_r10_and_r50():
    # the paper's TGIR mu (Table 2): R@10 and R@50 of each category with queries; R@1 and the means are shown only
    g = torch.Generator().manual_seed(0)
    galleries = {c: Items({"image": torch.randn(4, generator=g)} for _ in range(n))
                 for c, n in (("dress", 60), ("shirt", 55), ("toptee", 70))}
    ds = Items({"ref": torch.randn(4, generator=g), "text": torch.randn(4, generator=g), "category": torch.tensor(c),
                "target_index": torch.tensor(t)} for c, t in ((0, 3), (0, 10), (2, 5)))
    ds.categories, ds.join, ds.gallery = ["dress", "shirt", "toptee"], ", ", galleries.__getitem__
    fake = SimpleNamespace(fuse=lambda ref, text, task: ref + text, encode_image=lambda x, task: x)
    opts = SimpleNamespace(device="cpu", batch_size=2, workers=0, pictures=False)
    res = protocols.composed_retrieval(fake, "tgir", None, ds, opts)["tgir"]
    assert res["mu"] == ["dress R@10", "dress R@50", "toptee R@10", "toptee R@50"]  # shirt has no query
    assert res["chance"]["dress R@50"] == pytest.approx(100 * 50 / 60)
    assert res["chance"]["mean R@10"] == pytest.approx((100 * 10 / 60 + 100 * 10 / 70) / 2)


def test_class_chance_is_the_majority_label_not_the_prediction():
    # chance = always predicting the most frequent label; rows labelled -1 (unknown class) are left out
    y = torch.tensor([0, 0, 0, 1, 2, -1, -1, -1, -1])
    probs = F.one_hot(torch.full((9,), 2), 3).float()  # a model that always says class 2
    res = dict(metrics={}, chance={})
    protocols.class_scores(res, y, probs, which=("accuracy", "macro-F1"))
    assert res["metrics"] == pytest.approx({"accuracy": 20.0, "macro-F1": 100 / 9})
    assert res["chance"] == pytest.approx({"accuracy": 60.0, "macro-F1": 25.0})


def test_delta_is_relative_to_the_single_task_mu():
    # Delta = (mu - mu_STL) / mu_STL (Sec. 4); mu = the mean of the result's mu metrics only, chance alike
    results = {"xmr_random100": dict(task="xmr", mu=["a", "b"], metrics={"a": 40.0, "b": 60.0, "c": 0.0},
                                     chance={"a": 10.0, "b": 20.0, "c": 0.0})}
    params = dict(clip=1, tsa_per_task=1, xaa=1, heads={"xmr": 1}, total=4, saving=0.5)
    mu = evaluate.summarize(results, {"xmr": 40.0}, params)["xmr"]
    assert (mu["metrics"], mu["chance"], mu["stl"]) == (50.0, 15.0, 40.0)
    assert mu["delta"] == pytest.approx(0.25)  # divided by mu it would be 0.2


@pytest.mark.parametrize("change, full", [
    ({}, False),  # the tiny custom CLIP as trained
    (dict(model=model.CLIP_MODEL, clip_config=None, toy=""), True),  # the paper's backbone, by name, its data
    (dict(model=model.CLIP_MODEL, clip_config=None, toy="data/toy"), False),  # on ToyFashion
    (dict(model="ViT-B-32-quickgelu", clip_config=None, toy=""), False),  # another backbone
    (dict(model=model.CLIP_MODEL, toy=""), False)])  # the paper's name, but a custom config
def test_paper_figures_appear_exactly_beside_a_full_size_run(ckpt, tmp_path, capsys, change, full):
    path, _ = ckpt
    saved = model.read_checkpoint(path)
    saved["config"].update(change)  # what the report reads; the weights stay the tiny model's
    torch.save(saved, tmp_path / "ckpt.pt")
    r = evaluate.main([str(tmp_path / "ckpt.pt"), "--tasks", "scr", "--workers", "0"])
    printed = capsys.readouterr().out
    assert r["full_size"] is full
    assert ("not a full-size run" in printed) is not full
    assert (r["scr"].get("paper") == {"accuracy": 94.67, "macro-F1": 88.21}) is full  # Table 3
    assert ("paper  94.67" in printed) is full and (r["summary"]["mu"]["scr"]["paper"] is not None) is full
