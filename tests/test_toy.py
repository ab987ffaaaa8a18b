# Tests for toy.py: ToyFashion is deterministic, in the prepared layouts, and its tasks need what they test.
import json, os, subprocess, sys
import numpy as np
import pytest
from PIL import Image

import data
import prepare
import toy

S = 24  # the toy below is drawn at 24 px for a 24 px model: its arrays hold 27 x 27 squares
CFG = {"aug": "crop"}
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_files(d):
    return {os.path.relpath(os.path.join(p, f), d): open(os.path.join(p, f), "rb").read()
            for p, _, fs in os.walk(d) for f in fs}


def test_toy_is_deterministic(tmp_path):
    toy.make_toy(str(tmp_path / "a"), seed=3, products=60, size=32)
    toy.make_toy(str(tmp_path / "b"), seed=3, products=60, size=32)
    toy.make_toy(str(tmp_path / "c"), seed=4, products=60, size=32)
    a, b, c = (all_files(tmp_path / x) for x in "abc")
    assert len(a) > 100 and a == b
    assert a != c


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return str(d), toy.make_toy(str(d), seed=0, products=1500, size=24)  # enough for texts to risk colliding


def test_toy_content(toy_root):
    root, report = toy_root
    assert sorted(os.listdir(root)) == ["products", "triplets"]
    labels = data.read(os.path.join(root, "products", "labels.json"))
    assert list(labels) == list(toy.ATTRIBUTES) == ["category", "subcategory", "colour", "pattern", "detail"]
    assert len(labels["category"]) >= 6 and len(labels["subcategory"]) >= 12
    assert len(labels["colour"]) >= 8 and len(labels["pattern"]) >= 4 and len(labels["detail"]) >= 4
    recs = data.read(os.path.join(root, "products", "products.train.jsonl"))
    assert len(recs) == report["train"]["products"] and len(recs) + report["val"]["products"] == 1500
    texts = [r["text"] for r in recs]
    assert texts == [prepare.product_text(r["name"], r["description"]) for r in recs]
    assert len(set(texts)) == len(texts)  # XMR ground truth is unambiguous
    assert (data.tokenize(texts) != 0).sum(1).max() < 32  # the demo's context: no text is cut
    words = {s[0]: s[1] for c in toy.TOY_CATEGORIES.values() for s in c[2]}
    omitted = [r for r in recs if not r["meta"]["text_has_subcategory"]]
    assert 0.2 < len(omitted) / len(recs) < 0.4
    assert all(words[r["labels"]["subcategory"]] not in r["text"].lower() for r in omitted)
    assert all(words[r["labels"]["subcategory"]] in r["text"].lower() for r in recs if r not in omitted)
    assert 0.1 < sum(r["meta"]["ambiguous_image"] for r in recs) / len(recs) < 0.3
    assert {len(r["images"]) for r in recs} == {1, 2, 3}
    im = Image.open(os.path.join(root, "products", recs[0]["images"][0]))
    assert im.format == "PNG" and im.size == (24, 24) and im.mode == "RGB"
    ds = data.open_dataset("products", root, "train", 32, S, True, CFG)
    assert (ds.attrs >= 0).all() and ds[0]["image"].shape == (3, S, S)
    assert np.array_equal(ds.image(0), data.square(im, S))  # each view squared once, in record order
    assert ds[0]["colour"].item() == labels["colour"].index(recs[0]["labels"]["colour"])


def test_toy_triplets_need_fusion(toy_root):
    root, report = toy_root
    iq = os.path.join(root, "triplets")
    recs = {r["id"]: r for s in ("train", "val")
            for r in data.read(os.path.join(root, "products", f"products.{s}.jsonl"))}
    A = lambda r, a: r["labels"][a]
    n = 0
    for cat in toy.TOY_CATEGORIES:
        gallery = [recs[a] for a in data.read(os.path.join(iq, f"gallery.{cat.lower()}.train.json"))]
        assert all(A(r, "category") == cat for r in gallery)
        for t in data.read(os.path.join(iq, f"triplets.{cat.lower()}.train.jsonl")):
            ref, tgt, n = recs[t["candidate"]], recs[t["target"]], n + 1
            changed = [a for a in ("colour", "pattern", "subcategory") if A(ref, a) != A(tgt, a)]
            assert changed == list(t["change"]) and 1 <= len(changed) <= 2
            assert A(ref, "detail") == A(tgt, "detail")
            assert len(t["captions"]) == 2 and t["captions"][0] != t["captions"][1]
            if "colour" in changed:
                assert A(tgt, "colour") in t["captions"][0]
            if "subcategory" in changed:  # adjacent sub-categories only: "longer" / "shorter" names one
                level = lambda r: [s[0] for s in toy.TOY_CATEGORIES[cat][2]].index(A(r, "subcategory"))
                assert abs(level(tgt) - level(ref)) == 1
                assert ("longer" if level(tgt) > level(ref) else "shorter") in t["captions"][0]
            text_only = [g for g in gallery if all(A(g, a) == A(tgt, a) for a in changed)]
            fused = [g for g in gallery
                     if all(A(g, a) == (A(tgt, a) if a in changed else A(ref, a)) for a in toy.ATTRIBUTES)]
            assert len(text_only) >= 3 and fused == [tgt]
    assert n == report["train"]["triplets"] == round(0.3 * report["train"]["products"])
    ds = data.open_dataset("triplets", root, "train", 32, S, True, CFG)
    assert len(ds) == n and ds[0]["ref"].shape == (3, S, S)
    png = Image.open(os.path.join(iq, "images", t["target"] + ".png"))
    assert np.array_equal(ds.image(t["target"]), data.square(png, S))


def test_cli_toy(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT_DIR, "toy.py"), "--out", str(tmp_path),
                        "--products", "40", "--size", "32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train"]["products"] + json.loads(r.stdout)["val"]["products"] == 40
    assert sorted(os.listdir(tmp_path)) == ["products", "triplets"]
    assert data.read(str(tmp_path / "products" / "report.json")) == json.loads(r.stdout)
