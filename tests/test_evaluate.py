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
import sample
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


def test_end_to_end_json_and_pictures(ckpt, tmp_path):
    path, _ = ckpt
    out = evaluate.main([path, "--json", str(tmp_path / "r.json"), "--pictures", str(tmp_path / "pics"),
                         "--fic_limit", "4", "--batch_size", "32", "--workers", "0"])
    with open(tmp_path / "r.json") as f:
        r = json.load(f)
    assert r == json.loads(json.dumps(out))  # main returns what it writes
    for key in ("xmr_full", "xmr_random100", "tgir", "scr", "zeroshot", "fic", "cma"):
        assert r[key]["protocol"] and r[key]["metrics"].keys() <= r[key]["chance"].keys(), key
        assert all(v is None or 0 <= v <= 100 for v in r[key]["metrics"].values()), key
    assert set(r["xmr_full"]["metrics"]) == set(evaluate.XMR_KEYS) | {"mean"}
    assert set(r["xmr_random100"]["std"]) == set(evaluate.XMR_KEYS) and r["xmr_random100"]["n_neg"] > 0
    assert any(k.endswith("R@10") for k in r["tgir"]["metrics"]) and "mean R@50" in r["tgir"]["metrics"]
    noisy = {"accuracy, texts shuffled", "accuracy, images shuffled"}
    assert {"accuracy", "macro-F1", *noisy} <= r["scr"]["metrics"].keys()
    assert set(r["zeroshot"]["metrics"]) == {"accuracy", "macro-F1"}
    assert set(r["scr"]["lambda_image_weight"]["scr"]) == {"clean", "texts shuffled", "images shuffled"}
    assert all(0 < v < 1 for v in r["scr"]["lambda_image_weight"]["scr"].values())
    assert r["fic"]["n"] == 4 and set(r["fic"]["metrics"]) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert {f"{a} accuracy, images shuffled" for a in data.ATTRIBUTES} <= r["cma"]["metrics"].keys()
    assert set(r["summary"]["mu"]) == {"xmr", "tgir", "scr", "fic", "cma"} and r["summary"]["params"]["total"] > 0
    assert r["pictures"] and all(Image.open(p).size[0] > 0 for p in r["pictures"])
    assert any(p.endswith("scr_attention.png") for p in r["pictures"])


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
    evaluate.main([path, "--tasks", "xmr,zeroshot,tgir", "--batch_size", "16", "--workers", "0"])
    ds = data.ProductDataset(root, "val", lambda t: torch.zeros(len(t), 1), 32, train=False)
    iq = os.path.join(root, "fashioniq")
    cats = [c for c in data.TripletDataset(root, "val", lambda t: None, 32, False).categories
            if data.read(os.path.join(iq, f"triplets.{c}.val.jsonl"))]
    gallery = sum(len(data.read(os.path.join(iq, f"gallery.{c}.val.json"))) for c in cats)
    assert rows == {("encode_image", "xmr"): len(ds),  # shared by XMR and zero-shot
                    ("encode_text", "xmr"): len(ds.products) + ds.num_classes,  # product texts + one prompt per class
                    ("encode_image", "tgir"): gallery}  # each category's gallery once, not once per query


def test_delta_against_itself_is_zero(ckpt):
    path, _ = ckpt
    r = evaluate.main([path, "--tasks", "xmr", "--stl", path, "--workers", "0"])
    assert r["summary"]["mu"]["xmr"]["delta"] == 0.0


class Items(list):  # what classify reads of a ProductDataset: items and a few attributes
    pass


@pytest.mark.parametrize("reads", ["image", "text"])
def test_noisy_modality_bookkeeping(reads):
    # a fake classifier that reads the label off one modality: shuffling that modality must drop its accuracy to about
    # chance (1/C), shuffling the other must not change it at all
    n, C = 60, 4
    y = torch.arange(n) % C
    ds = Items({"image": y[i].float()[None]} for i in range(n))  # the "image" is its label
    ds.texts, ds.image_product = [str(int(v)) for v in y], torch.arange(n)
    ds.attrs = torch.stack([torch.full((n,), -1), y], 1)  # column 1 = the SCR label
    tok = lambda texts: torch.tensor([[int(t)] for t in texts])  # the "text" is its label too
    m = SimpleNamespace(fusers={}, heads={"scr": lambda f: F.one_hot(f.long(), C).float()},
                        fuse=lambda image, tokens, task: (image if reads == "image" else tokens)[:, 0])
    r = evaluate.classify(m, ds, tok, SimpleNamespace(device="cpu", batch_size=16, workers=0), "scr")
    kept, lost = ("texts shuffled", "images shuffled")[::1 if reads == "image" else -1]
    assert r["metrics"]["accuracy"] == 100 and r["metrics"][f"accuracy, {kept}"] == 100
    assert r["metrics"][f"accuracy, {lost}"] < 50
    assert r["chance"]["accuracy"] == 25  # the majority class of a balanced 4-class set


def test_sample_captions_and_labels(ckpt, capsys):
    path, root = ckpt
    image = os.path.join(root, "fashiongen", "images", "00000_0.png")
    sample.main([path, image, "--caption", "--labels", "shirt,dress,bag"])
    out = capsys.readouterr().out
    assert "caption:" in out
    assert out.split("zero-shot label: ")[1].split(" ")[0] in ("shirt", "dress", "bag")
