"""evaluate.py end to end on a tiny checkpoint, the encode-once guarantee, the noisy-modality bookkeeping, sample.py."""
import collections
import json
import os
from types import SimpleNamespace

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


def test_end_to_end_json_and_pictures(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = evaluate.main([path, "--json", str(tmp_path / "r.json"), "--pictures", str(tmp_path / "pics"),
                         "--fic_limit", "4", "--batch_size", "32", "--workers", "0"])
    printed = capsys.readouterr().out
    with open(tmp_path / "r.json") as f:
        r = json.load(f)
    assert r == json.loads(json.dumps(out))  # main returns what it writes
    for key in ("xmr_full", "xmr_random100", "xmr_zeroshot", "tgir", "scr", "fic", "cma"):
        assert r[key]["protocol"] in printed and r[key]["task"] == key.split("_")[0], key
        assert r[key]["metrics"] and r[key]["metrics"].keys() <= r[key]["chance"].keys(), key
        assert all(v is None or 0 <= v <= 100 for v in r[key]["metrics"].values()), key
    assert set(r["xmr_full"]["metrics"]) == set(protocols.XMR_KEYS) | {"mean"}
    assert set(r["xmr_random100"]["std"]) == set(protocols.XMR_KEYS) and r["xmr_random100"]["n_neg"] > 0
    assert r["xmr_random100"]["mu"] == protocols.XMR_KEYS and "mu" not in r["xmr_full"]
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
    cfg = {"aug": "crop", "caption_join": ", "}
    ds = data.open_dataset("products", root, "val", lambda t: torch.zeros(len(t), 1), 32, False, cfg)
    triplets = data.open_dataset("triplets", root, "val", lambda t: None, 32, False, cfg)
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
    ds.attrs = y[:, None]
    tok = lambda texts: torch.tensor([[int(t)] for t in texts])  # the "text" is its label too
    fake = SimpleNamespace(named_modules=lambda: [], xaa={})
    row = SimpleNamespace(head="subcategory", mode="fusion",
                          logits=lambda m, b, t: (F.one_hot(b[reads][:, 0].long(), C).float(),))
    opts = SimpleNamespace(device="cpu", batch_size=16, workers=0, tokenizer=tok, pictures=False)
    r = protocols.classification(fake, "scr", row, ds, opts)["scr"]
    kept, lost = ("texts shuffled", "images shuffled")[::1 if reads == "image" else -1]
    assert r["metrics"]["accuracy"] == 100 and r["metrics"][f"accuracy, {kept}"] == 100
    assert r["metrics"][f"accuracy, {lost}"] < 50
    assert r["chance"]["accuracy"] == 25  # the majority class of a balanced 4-class set


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
    assert scr[0] == "subcategory:" and len(scr) == 4  # the top 3 sub-categories, by name
    assert any(name in line for line in scr for name in ("SHIRTS", "DRESSES", "SKIRTS", "TOPS", "PANTS", "BAGS",
                                                         "SHOES", "BOOTS", "SNEAKERS", "CLUTCHES"))
    cma = sample.main([path, image, "--task", "cma", "--text", "Red striped shirt."])
    assert [line for line in cma if not line.startswith(" ")] == [f"{a}:" for a in toy.ATTRIBUTES]
    with pytest.raises(ValueError, match="--task scr needs --text"):
        sample.main([path, image, "--task", "scr"])
    with pytest.raises(ValueError, match=r"--task \?: choose one of the checkpoint's tasks"):
        sample.main([path, image])
