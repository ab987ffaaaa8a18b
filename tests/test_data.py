# Tests for data.py: converters on format-faithful fixtures, the loaders on their output, ToyFashion, bad inputs.
import json, os, subprocess, sys
import h5py
import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN, OPENAI_DATASET_STD as STD
from PIL import Image

import data

S = 32  # image size used by the loaders in these tests
EOT = 49407
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer("ViT-B-16-quickgelu", context_length=48)


# ---------------------------------------------------------------------------------------------------- FashionGen fixture

# (productID, name, description, category, subcategory, pose) per h5 row; rows of a product are contiguous
TRAIN_ROWS = [
    (101, b"Navy tee ", b"Cotton t-shirt.\n", b"TOPS", b"T-SHIRTS", b"id_gridfs_1"),
    (101, b"Navy tee ", b"Cotton t-shirt.\n", b"TOPS", b"T-SHIRTS", b"id_gridfs_2"),
    (102, b"Black boots", b"Leather boots.", b"SHOES", b"BOOTS", b"id_gridfs_1"),
    (103, b"Red dress", b"Silk dress.", b"DRESSES", b"DRESSES", b"id_gridfs_1"),
    (103, b"Red dress", b"Silk dress.", b"DRESSES", b"DRESSES", b"id_gridfs_2"),
    (103, b"Red dress", b"Silk dress.", b"DRESSES", b"DRESSES", b"id_gridfs_3"),
]
VAL_ROWS = [
    (201, b"Caf\xe9 shirt", b"Cr\xe8me cotton.", b"TOPS", b"T-SHIRTS", b"id_gridfs_1"),  # latin-1 bytes
    (202, b"Wool cape", b"Long cape.", b"OUTERWEAR", b"CAPES", b"id_gridfs_1"),  # CAPES: validation-only class
    (202, b"Wool cape", b"Long cape.", b"OUTERWEAR", b"CAPES", b"id_gridfs_2"),
]


def row_colour(i):  # a distinct flat colour per row, so we can tell which row an item's image came from
    return (20 + 35 * i, 200 - 25 * i, 90)


def make_h5(path, rows, drop=None):
    n = len(rows)
    cols = {"input_image": np.stack([np.full((256, 256, 3), row_colour(i), np.uint8) for i in range(n)]),
            "input_productID": np.array([[r[0]] for r in rows], dtype=np.int64),
            "index_2": np.arange(n, dtype=np.int64)}  # 1-D in the release
    for j, k in enumerate(["input_name", "input_description", "input_category", "input_subcategory", "input_pose"], 1):
        cols[k] = np.array([[r[j]] for r in rows], dtype="S")  # (N, 1) fixed-length byte strings
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            if k != drop:
                f.create_dataset(k, data=v)
    return str(path)


@pytest.fixture(scope="module")
def fg_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fg")
    report = data.prepare_fashiongen(make_h5(d / "fashiongen_256_256_train.h5", TRAIN_ROWS),
                                     make_h5(d / "fashiongen_256_256_validation.h5", VAL_ROWS), str(d / "root"))
    return str(d / "root"), report


def test_fashiongen_convert(fg_root):
    root, report = fg_root
    assert report["train"] == {"products": 3, "images": 6, "ids_in_several_runs": 0}
    assert report["val"] == {"products": 2, "images": 3, "ids_in_several_runs": 0}
    assert report["classes"] == 3
    assert report["val_subcategories_not_in_train"] == ["CAPES"] and report["val_products_unknown_subcategory"] == 1
    labels = json.load(open(os.path.join(root, "fashiongen", "labels.json")))
    assert labels == {"subcategory": ["BOOTS", "DRESSES", "T-SHIRTS"], "category": ["DRESSES", "SHOES", "TOPS"]}
    recs = data.read(os.path.join(root, "fashiongen", "products.train.jsonl"))
    assert [r["id"] for r in recs] == ["101", "102", "103"] and [len(r["images"]) for r in recs] == [2, 1, 3]
    assert recs[0]["name"] == "Navy tee" and recs[0]["description"] == "Cotton t-shirt."  # stripped
    val = data.read(os.path.join(root, "fashiongen", "products.val.jsonl"))
    assert val[0]["name"] == "Café shirt" and val[0]["description"] == "Crème cotton."  # latin-1 decoded
    assert sorted(os.listdir(root)) == ["fashiongen"]  # no temp dirs left behind
    im = Image.open(os.path.join(root, "fashiongen", recs[2]["images"][1]))
    assert im.format == "JPEG" and im.size == (256, 256)
    assert np.abs(np.asarray(im, dtype=float).mean((0, 1)) - row_colour(4)).max() < 3  # row 4 = 2nd view of 103


def test_product_dataset_train(fg_root, tok):
    ds = data.ProductDataset(fg_root[0], "train", tok, S, train=True)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.unknown_labels == 0
    assert ds.texts == ["Navy tee. Cotton t-shirt.", "Black boots. Leather boots.", "Red dress. Silk dress."]
    item = ds[(2, 7)]
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["text"].shape == (48,) and item["text"].dtype == torch.long and torch.equal(item["text"], tok([ds.texts[2]])[0])
    assert item["label"].item() == 1 and item["product"].item() == 2  # DRESSES is index 1 of the sorted label map
    assert item["attrs"].tolist() == [0, 1, -1, -1, -1]  # category DRESSES, sub-category DRESSES, no toy attributes
    assert torch.equal(ds[(2, 7)]["image"], item["image"])  # a pure function of (index, seed)
    assert len({ds[(2, s)]["image"].sum().item() for s in range(12)}) > 1  # ... that does vary with the seed
    assert len({round(ds[(2, s)]["image"][0].mean().item(), 1) for s in range(12)}) == 3  # the seed picks among 3 views
    assert torch.equal(ds[1]["image"], ds[(1, 1)]["image"])  # an int key uses seed = index
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, S, S) and batch["attrs"].shape == (2, len(data.ATTRIBUTES))


def test_product_dataset_eval_unknown_label_and_latin1(fg_root, tok, capsys):
    ds = data.ProductDataset(fg_root[0], "val", tok, S, train=False)
    out = capsys.readouterr().out
    assert "products.val.jsonl" in out and "202" in out and "label -1" in out
    assert len(ds) == 3 and ds.unknown_labels == 2  # both images of the CAPES product
    assert ds.image_product.tolist() == [0, 1, 1]
    assert ds.texts[0] == "Café shirt. Crème cotton."
    assert [ds[i]["label"].item() for i in range(3)] == [2, -1, -1]
    assert ds[0]["attrs"].tolist() == [2, 2, -1, -1, -1] and ds[1]["attrs"].tolist() == [-1, -1, -1, -1, -1]
    for i in range(3):  # eval: item i is image i, centre-cropped, CLIP-normalised
        x = ds[i]["image"]
        want = (torch.tensor(row_colour(i)) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert (x.mean((1, 2)) - want).abs().max() < 0.05


def test_h5_chunks_and_recurring_ids(tmp_path):
    rows = TRAIN_ROWS + [TRAIN_ROWS[0]]  # product 101 again after others: kept apart, and counted
    path = make_h5(tmp_path / "t.h5", rows)
    small, report = data.h5_products(path, str(tmp_path / "a"), "train", chunk=2)  # runs cross chunk borders
    big, _ = data.h5_products(path, str(tmp_path / "b"), "train")
    assert small == big and [r["id"] for r in small] == ["101", "102", "103", "101"]
    assert small[3]["images"] == ["images/train/6.jpg"] and report == {"products": 4, "images": 7, "ids_in_several_runs": 1}


def test_h5_missing_key_leaves_nothing(tmp_path):
    train = make_h5(tmp_path / "train.h5", TRAIN_ROWS)
    val = make_h5(tmp_path / "val.h5", VAL_ROWS, drop="input_subcategory")
    with pytest.raises(KeyError, match=r"val\.h5.*input_subcategory"):
        data.prepare_fashiongen(train, val, str(tmp_path / "root"))
    assert os.listdir(tmp_path / "root") == []  # train was converted first, yet nothing half-written remains


# ---------------------------------------------------------------------------------------------------- FashionIQ fixture

def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def make_fiq(d):
    for a in ["A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "Z9"]:
        os.makedirs(d / "images", exist_ok=True)
        Image.new("RGB", (40, 60), (int(a[1]) * 20, 50, 50)).save(d / "images" / f"{a}.jpg")
    Image.new("RGB", (50, 50), (0, 0, 255)).save(d / "images" / "B1.png")  # some releases ship .png
    caps = {
        ("dress", "train"): [{"candidate": "A1", "target": "A2", "captions": ["is red ", "  has  dots"]},  # stray whitespace
                             {"candidate": "A2", "target": "A3", "captions": ["", "is longer"]},  # one empty: keep the other
                             {"candidate": "A3", "target": "A1", "captions": ["", "  "]},  # both empty: skipped
                             {"candidate": "A4", "target": "DEAD", "captions": ["x", "y"]}],  # dead URL: skipped
        ("dress", "val"): [{"candidate": " A5", "target": "B1", "captions": ["is blue", "darker"]}],
        ("shirt", "train"): [{"candidate": "A7", "target": "A8", "captions": ["has a collar", "collared"]}],
        ("shirt", "val"): [], ("toptee", "train"): [], ("toptee", "val"): []}
    splits = {("dress", "train"): ["A1", "A2", "A3", "A4", "DEAD"], ("dress", "val"): ["A5", "B1", "A6"],
              ("shirt", "train"): ["A7"], ("shirt", "val"): ["A7"], ("toptee", "train"): [], ("toptee", "val"): []}
    for (cat, split), v in caps.items():
        write_json(str(d / "captions" / f"cap.{cat}.{split}.json"), v)
        write_json(str(d / "image_splits" / f"split.{cat}.{split}.json"), splits[(cat, split)])
    return str(d)


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fiq")
    report = data.prepare_fashioniq(make_fiq(d / "src"), str(d / "root"))
    return str(d / "root"), report


def test_fashioniq_convert(fiq_root):
    root, report = fiq_root
    assert report == {"whitespace_fixed": 3, "empty_captions": 3, "skipped_empty": 1, "skipped_missing_image": 1,
                      "gallery_missing_image": 1, "target_added_to_gallery": 1, "images": 9,
                      "triplets.dress.train": 2, "triplets.dress.val": 1, "triplets.shirt.train": 1,
                      "triplets.shirt.val": 0, "triplets.toptee.train": 0, "triplets.toptee.val": 0}
    fiq = os.path.join(root, "fashioniq")
    assert json.load(open(os.path.join(fiq, "report.json"))) == report
    assert data.read(os.path.join(fiq, "triplets.dress.train.jsonl")) == [
        {"candidate": "A1", "target": "A2", "captions": ["is red", "has dots"]},
        {"candidate": "A2", "target": "A3", "captions": ["is longer"]}]
    assert data.read(os.path.join(fiq, "gallery.dress.train.json")) == ["A1", "A2", "A3", "A4"]
    assert data.read(os.path.join(fiq, "gallery.shirt.train.json")) == ["A7", "A8"]  # target added
    assert sorted(os.listdir(os.path.join(fiq, "images"))) == sorted([f"A{i}.jpg" for i in range(1, 9)] + ["B1.png"])


def test_triplet_and_gallery_datasets(fiq_root, tok):
    root = fiq_root[0]
    ds = data.TripletDataset(root, "train", tok, S, train=True)
    assert ds.categories == ["dress", "shirt", "toptee"] and len(ds) == 3
    item = ds[(0, 3)]
    assert item["ref"].shape == (3, S, S) and item["target"].shape == (3, S, S)
    assert torch.equal(item["text"], tok(["is red, has dots"])[0])  # captions joined with ", " (the reference code)
    assert item["category"].item() == 0 and item["target_index"].item() == 1
    assert torch.equal(ds[1]["text"], tok(["is longer"])[0])
    assert (ds[2]["category"].item(), ds[2]["target_index"].item()) == (1, 1)
    assert torch.equal(ds[(0, 3)]["ref"], item["ref"])
    joined = data.TripletDataset(root, "train", tok, S, train=False, join=" and ", categories=["dress"])
    assert len(joined) == 2 and torch.equal(joined[0]["text"], tok(["is red and has dots"])[0])
    val = data.TripletDataset(root, "val", tok, S, train=False)
    assert len(val) == 1 and val[0]["target_index"].item() == 1  # B1 in ["A5", "B1", "A6"]
    gal = data.GalleryDataset(root, "dress", "val", S)
    assert gal.asins == ["A5", "B1", "A6"] and len(gal) == 3
    g = gal[1]
    assert g["index"].item() == 1 and g["image"].shape == (3, S, S)
    assert torch.equal(g["image"], val[0]["target"])  # eval transform: the same tensor either way
    blue = (torch.tensor([0., 0., 1.]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (g["image"].mean((1, 2)) - blue).abs().max() < 0.05


def test_empty_task_dataset(fiq_root, tok):
    with pytest.raises(ValueError, match=r"triplets\.shirt\.val\.jsonl"):
        data.TripletDataset(fiq_root[0], "val", tok, S, train=False, categories=["shirt"])
    with pytest.raises(ValueError, match=r"triplets\.\*\.test\.jsonl"):
        data.TripletDataset(fiq_root[0], "test", tok, S, train=False)
    with pytest.raises(ValueError, match=r"gallery\.toptee\.val\.json"):
        data.GalleryDataset(fiq_root[0], "toptee", "val", S)


def test_fashioniq_malformed_json_keeps_old_output(tmp_path):
    src = make_fiq(tmp_path / "src")
    data.prepare_fashioniq(src, str(tmp_path / "root"))
    before = sorted(os.listdir(tmp_path / "root" / "fashioniq"))
    path = os.path.join(src, "captions", "cap.shirt.val.json")
    with open(path, "w") as f:
        f.write('[{"candidate": "A7", "target": "A8", "capt')  # truncated download
    with pytest.raises(ValueError, match=r"cap\.shirt\.val\.json:1: malformed JSON"):
        data.prepare_fashioniq(src, str(tmp_path / "root"))
    assert sorted(os.listdir(tmp_path / "root")) == ["fashioniq"]  # no temp dir; the old output untouched
    assert sorted(os.listdir(tmp_path / "root" / "fashioniq")) == before
    write_json(path, [{"candidate": "A7", "captions": ["x"]}])  # valid JSON, wrong record
    with pytest.raises(ValueError, match=r"cap\.shirt\.val\.json: record 0"):
        data.prepare_fashioniq(src, str(tmp_path / "root"))
    write_json(path, [{"candidate": "A7", "target": "A7", "captions": ["same"]}])
    assert data.prepare_fashioniq(src, str(tmp_path / "root"))["triplets.shirt.val"] == 1  # replaces the old output
    assert data.read(str(tmp_path / "root" / "fashioniq" / "triplets.shirt.val.jsonl"))[0]["captions"] == ["same"]
    assert sorted(os.listdir(tmp_path / "root")) == ["fashioniq"]


# ---------------------------------------------------------------------------------------------------- bad inputs at load

def test_missing_and_corrupt_images(tmp_path, tok):
    src = make_fiq(tmp_path / "src")
    data.prepare_fashioniq(src, str(tmp_path / "root"))
    ds = data.TripletDataset(str(tmp_path / "root"), "train", tok, S, train=True)
    img_dir = tmp_path / "root" / "fashioniq" / "images"
    os.remove(img_dir / "A3.jpg")
    with pytest.raises(FileNotFoundError, match=r"A3\.jpg: image of triplet A2->A3 \(dress\) not found"):
        ds[1]
    good = open(img_dir / "A1.jpg", "rb").read()
    os.remove(img_dir / "A1.jpg")  # unlink first: the file is a hard link to the source
    (img_dir / "A1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    with pytest.raises(ValueError, match=r"A1\.jpg: unreadable image of triplet A1->A2"):
        ds[0]
    os.remove(img_dir / "A7.jpg")
    (img_dir / "A7.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"A7\.jpg: unreadable image of triplet A7->A8"):
        ds[2]


def test_product_missing_corrupt_image_and_bad_jsonl(tmp_path, tok):
    root = tmp_path / "root"
    data.prepare_fashiongen(make_h5(tmp_path / "t.h5", TRAIN_ROWS), make_h5(tmp_path / "v.h5", VAL_ROWS), str(root))
    fg = root / "fashiongen"
    ds = data.ProductDataset(str(root), "val", tok, S, train=False)
    os.remove(fg / ds.products[0]["images"][0])
    with pytest.raises(FileNotFoundError, match=r"images/val/0\.jpg: image of product 201"):
        ds[0]
    (fg / ds.products[1]["images"][0]).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"images/val/1\.jpg: unreadable image of product 202"):
        ds[1]
    lines = open(fg / "products.train.jsonl").read().splitlines()
    (fg / "products.train.jsonl").write_text("\n".join(lines[:2] + [lines[2][:30]]))  # truncated last line
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:3: malformed JSON"):
        data.ProductDataset(str(root), "train", tok, S, train=True)
    (fg / "products.train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl: no products"):
        data.ProductDataset(str(root), "train", tok, S, train=True)
    (fg / "products.train.jsonl").write_text(json.dumps({"id": "9", "name": "x", "images": ["a.jpg"]}) + "\n")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:1: record 9 lacks"):
        data.ProductDataset(str(root), "train", tok, S, train=True)


# ---------------------------------------------------------------------------------------------------- tokenizer, transforms

def test_tokenizer_truncates_long_text_with_eot_last(tok):
    ids = tok(["a very long product description " * 40, "short"])
    assert ids.shape == (2, 48) and ids.dtype == torch.long
    assert ids[0, 0].item() == 49406 and ids[0, -1].item() == EOT and (ids[0] != 0).all()
    assert ids[1, 2].item() == EOT and (ids[1, 3:] == 0).all()
    assert data.get_tokenizer()(["x " * 200]).shape == (1, 77)


def test_transform_is_seeded_and_leaves_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    state = torch.get_rng_state()
    for aug in ("crop", "rrc"):
        a, b = data.transform(img, S, True, seed="7/1", aug=aug), data.transform(img, S, True, seed="7/1", aug=aug)
        assert a.shape == (3, S, S) and torch.equal(a, b)
        assert any(not torch.equal(a, data.transform(img, S, True, seed=s, aug=aug)) for s in range(5))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(data.transform(img, S), data.transform(img, S, seed=123))  # eval ignores the seed
    with pytest.raises(ValueError, match="aug"):
        data.transform(img, S, True, aug="rcc")


# ---------------------------------------------------------------------------------------------------- ToyFashion

def all_files(d):
    return {os.path.relpath(os.path.join(p, f), d): open(os.path.join(p, f), "rb").read() for p, _, fs in os.walk(d) for f in fs}


def test_toy_is_deterministic(tmp_path):
    data.make_toy(str(tmp_path / "a"), seed=3, products=60, size=32)
    data.make_toy(str(tmp_path / "b"), seed=3, products=60, size=32)
    data.make_toy(str(tmp_path / "c"), seed=4, products=60, size=32)
    a, b, c = (all_files(tmp_path / x) for x in "abc")
    assert len(a) > 100 and a == b
    assert a != c


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return str(d), data.make_toy(str(d), seed=0, products=1500, size=24)  # big enough for texts to risk colliding


def test_toy_content(toy_root, tok):
    root, report = toy_root
    labels = data.read(os.path.join(root, "fashiongen", "labels.json"))
    assert len(labels["category"]) >= 6 and len(labels["subcategory"]) >= 12
    assert len(labels["colour"]) >= 8 and len(labels["pattern"]) >= 4 and len(labels["detail"]) >= 4
    recs = data.read(os.path.join(root, "fashiongen", "products.train.jsonl"))
    assert len(recs) == report["train"]["products"] and len(recs) + report["val"]["products"] == 1500
    texts = [f"{r['name']}. {r['description']}" for r in recs]
    assert len(set(texts)) == len(texts)  # XMR ground truth is unambiguous
    assert (tok(texts) != 0).sum(1).max() < 40
    words = {s[0]: s[1] for c in data.TOY_CATEGORIES.values() for s in c[2]}
    omitted = [r for r in recs if not r["attributes"]["text_has_subcategory"]]
    assert 0.2 < len(omitted) / len(recs) < 0.4 and all(words[r["subcategory"]] not in t.lower() for r, t in zip(recs, texts) if r in omitted)
    assert all(words[r["subcategory"]] in t.lower() for r, t in zip(recs, texts) if r not in omitted)
    assert 0.1 < sum(r["attributes"]["ambiguous_image"] for r in recs) / len(recs) < 0.3
    assert {len(r["images"]) for r in recs} == {1, 2, 3}
    im = Image.open(os.path.join(root, "fashiongen", recs[0]["images"][0]))
    assert im.format == "PNG" and im.size == (24, 24) and im.mode == "RGB"
    ds = data.ProductDataset(root, "train", tok, S, train=True)
    assert (ds.attrs >= 0).all() and ds[0]["image"].shape == (3, S, S)


def test_toy_triplets_need_fusion(toy_root, tok):
    root, report = toy_root
    fiq = os.path.join(root, "fashioniq")
    recs = {r["id"]: r for s in ("train", "val") for r in data.read(os.path.join(root, "fashiongen", f"products.{s}.jsonl"))}
    A = lambda r, a: r["attributes"].get(a, r.get(a))
    n = 0
    for cat in data.TOY_CATEGORIES:
        gallery = [recs[a] for a in data.read(os.path.join(fiq, f"gallery.{cat.lower()}.train.json"))]
        assert all(r["category"] == cat for r in gallery)
        for t in data.read(os.path.join(fiq, f"triplets.{cat.lower()}.train.jsonl")):
            ref, tgt, n = recs[t["candidate"]], recs[t["target"]], n + 1
            changed = [a for a in ("colour", "pattern", "subcategory") if A(ref, a) != A(tgt, a)]
            assert changed == list(t["change"]) and 1 <= len(changed) <= 2 and A(ref, "detail") == A(tgt, "detail")
            assert len(t["captions"]) == 2 and t["captions"][0] != t["captions"][1]
            if "colour" in changed:
                assert A(tgt, "colour") in t["captions"][0]
            if "subcategory" in changed:  # adjacent sub-categories only, so "longer" / "shorter" names one target
                level = lambda r: [s[0] for s in data.TOY_CATEGORIES[cat][2]].index(r["subcategory"])
                assert abs(level(tgt) - level(ref)) == 1 and ("longer" if level(tgt) > level(ref) else "shorter") in t["captions"][0]
            text_only = [g for g in gallery if all(A(g, a) == A(tgt, a) for a in changed)]
            fused = [g for g in gallery if all(A(g, a) == (A(tgt, a) if a in changed else A(ref, a)) for a in data.ATTRIBUTES)]
            assert len(text_only) >= 3 and fused == [tgt]
    assert n == report["train"]["triplets"] == round(0.3 * report["train"]["products"])
    ds = data.TripletDataset(root, "train", tok, S, train=True)
    assert len(ds) == n and ds[0]["ref"].shape == (3, S, S)
    assert os.path.exists(os.path.join(fiq, "images", recs[t["target"]]["id"] + ".png"))


def test_cli_toy(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT_DIR, "data.py"), "toy", "--out", str(tmp_path), "--products", "40",
                        "--size", "32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train"]["products"] + json.loads(r.stdout)["val"]["products"] == 40
    assert sorted(os.listdir(tmp_path)) == ["fashiongen", "fashioniq"]
