# Tests for data.py: the datasets on converted fixtures (built by test_prepare's format-faithful
# releases), bad inputs at load, open_dataset / data_roots, tokenizer, transforms.
import json, os, random
import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN, OPENAI_DATASET_STD as STD
from PIL import Image

import data
import prepare
from test_prepare import TRAIN_ROWS, VAL_ROWS, make_fiq, make_h5, row_colour

S = 32  # image size used by the loaders in these tests
EOT = 49407
CFG = {"aug": "crop", "caption_join": ", "}  # the keys of a run's config the datasets read


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer("ViT-B-16-quickgelu", context_length=48)


def products(root, split, tok, train):
    return data.open_dataset("products", root, split, tok, S, train, CFG)


@pytest.fixture(scope="module")
def fg_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fg")
    prepare.fashiongen(make_h5(d / "t.h5", TRAIN_ROWS), make_h5(d / "v.h5", VAL_ROWS), str(d / "root"))
    return str(d / "root")


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fiq")
    prepare.fashioniq(make_fiq(d / "src"), str(d / "root"))
    return str(d / "root")


# -------------------------------------------------------------------------------- datasets
def test_product_dataset_train(fg_root, tok):
    ds = products(fg_root, "train", tok, train=True)
    assert ds.dir == os.path.join(fg_root, "products") and len(ds) == 3 and ds.unknown_labels == 0
    assert ds.attributes == ["category", "subcategory"] and ds.class_attribute == "subcategory"
    assert ds.classes == {"category": 3, "subcategory": 3, "class": 3} and ds.source == "fashiongen"
    assert ds.texts == ["Navy tee. Cotton t-shirt.", "Black boots. Leather boots.", "Red dress. Silk dress."]
    item = ds[(2, 7)]
    assert set(item) == {"image", "text", "product", "attrs", "category", "subcategory", "class"} == ds.keys
    assert item["class"] == item["subcategory"]  # the class attribute's label, under the name SCR reads
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["text"].shape == (48,) and torch.equal(item["text"], tok([ds.texts[2]])[0])
    assert item["subcategory"].item() == 1 and item["product"].item() == 2  # DRESSES: 1 in the sorted map
    assert item["attrs"].tolist() == [0, 1] and item["category"].item() == 0  # in ds.attributes order
    assert torch.equal(ds[(2, 7)]["image"], item["image"])  # a pure function of (index, seed)
    assert len({ds[(2, s)]["image"].sum().item() for s in range(12)}) > 1  # ... that does vary with the seed
    views = {round(ds[(2, s)]["image"][0].mean().item(), 1) for s in range(12)}
    assert len(views) == 3  # the seed picks among 3 views
    assert torch.equal(ds[1]["image"], ds[(1, 1)]["image"])  # an int key uses seed = index
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, S, S) and batch["attrs"].shape == (2, 2)
    assert batch["subcategory"].tolist() == [2, 0]


def test_product_dataset_eval_unknown_label_and_latin1(fg_root, tok, capsys):
    ds = products(fg_root, "val", tok, train=False)
    out = capsys.readouterr().out
    assert "products.val.jsonl" in out and "202" in out and "label -1" in out
    assert len(ds) == 3 and ds.unknown_labels == 2  # both images of the CAPES product
    assert ds.image_product.tolist() == [0, 1, 1] and ds.image_view == [0, 0, 1]
    assert ds.image_path(2) == os.path.join(ds.dir, "images", "val", "2.jpg")
    assert ds.texts[0] == "Café shirt. Crème cotton."
    assert [ds[i]["subcategory"].item() for i in range(3)] == [2, -1, -1]
    assert ds[0]["attrs"].tolist() == [2, 2] and ds[1]["attrs"].tolist() == [-1, -1]
    for i in range(3):  # eval: item i is image i, centre-cropped, CLIP-normalised
        x = ds[i]["image"]
        want = (torch.tensor(row_colour(i)) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert (x.mean((1, 2)) - want).abs().max() < 0.05


def test_triplet_and_gallery_datasets(fiq_root, tok):
    root = fiq_root  # ROOT, holding triplets/
    ds = data.open_dataset("triplets", root, "train", tok, S, True, CFG)
    assert ds.dir == os.path.join(root, "triplets") and ds.join == ", "
    assert ds.categories == ["dress", "shirt", "toptee"] and len(ds) == 3
    item = ds[(0, 3)]
    assert set(item) == {"ref", "text", "target", "category", "target_index"}
    assert item["ref"].shape == (3, S, S) and item["target"].shape == (3, S, S)
    assert torch.equal(item["text"], tok(["is red, has dots"])[0])  # joined with ", " (the reference code)
    assert item["category"].item() == 0 and item["target_index"].item() == 1
    assert ds.triplets[0] == (0, {"candidate": "A1", "target": "A2", "captions": ["is red", "has dots"]}, 1)
    assert torch.equal(ds[1]["text"], tok(["is longer"])[0])
    assert (ds[2]["category"].item(), ds[2]["target_index"].item()) == (1, 1)
    assert torch.equal(ds[(0, 3)]["ref"], item["ref"])
    iq = os.path.join(root, "triplets")
    joined = data.TripletDataset(iq, "train", tok, S, False, {**CFG, "caption_join": " and "}, ["dress"])
    assert len(joined) == 2 and torch.equal(joined[0]["text"], tok(["is red and has dots"])[0])
    val = data.TripletDataset(iq, "val", tok, S, False, CFG)
    assert len(val) == 1 and val[0]["target_index"].item() == 1  # B1 in ["A5", "B1", "A6"]
    assert val.image_path("B1") == os.path.join(iq, "images", "B1.png")  # the listed file, not B1.jpg
    gal = val.gallery("dress")
    assert gal.asins == ["A5", "B1", "A6"] and len(gal) == 3
    g = gal[1]
    assert g["index"].item() == 1 and g["image"].shape == (3, S, S)
    assert torch.equal(g["image"], val[0]["target"])  # eval transform: the same tensor either way
    blue = (torch.tensor([0., 0., 1.]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (g["image"].mean((1, 2)) - blue).abs().max() < 0.05


def test_empty_task_dataset(fiq_root, tok):
    iq = os.path.join(fiq_root, "triplets")
    with pytest.raises(ValueError, match=r"triplets\.shirt\.val\.jsonl"):
        data.TripletDataset(iq, "val", tok, S, False, CFG, categories=["shirt"])
    with pytest.raises(ValueError, match=r"triplets\.\*\.test\.jsonl"):
        data.TripletDataset(iq, "test", tok, S, False, CFG)
    with pytest.raises(ValueError, match=r"gallery\.toptee\.val\.json"):
        data.TripletDataset(iq, "val", tok, S, False, CFG).gallery("toptee")


# -------------------------------------------------------------------------------- bad inputs at load

def test_missing_and_corrupt_images(tmp_path, tok):
    src = make_fiq(tmp_path / "src")
    prepare.fashioniq(src, str(tmp_path / "root"))
    ds = data.open_dataset("triplets", str(tmp_path / "root"), "train", tok, S, True, CFG)
    img_dir = tmp_path / "root" / "triplets" / "images"
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
    prepare.fashiongen(make_h5(tmp_path / "t.h5", TRAIN_ROWS), make_h5(tmp_path / "v.h5", VAL_ROWS),
                       str(root))
    fg = root / "products"
    ds = products(str(root), "val", tok, train=False)
    os.remove(fg / ds.products[0]["images"][0])
    with pytest.raises(FileNotFoundError, match=r"images/val/0\.jpg: image of product 201"):
        ds[0]
    (fg / ds.products[1]["images"][0]).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"images/val/1\.jpg: unreadable image of product 202"):
        ds[1]
    lines = open(fg / "products.train.jsonl").read().splitlines()
    (fg / "products.train.jsonl").write_text("\n".join(lines[:2] + [lines[2][:30]]))  # truncated last line
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:3: malformed JSON"):
        products(str(root), "train", tok, train=True)
    (fg / "products.train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl: no products"):
        products(str(root), "train", tok, train=True)
    (fg / "products.train.jsonl").write_text(json.dumps({"id": "9", "name": "x", "images": ["a.jpg"]}) + "\n")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:1: record 9 lacks one of id/text/images"):
        products(str(root), "train", tok, train=True)
    (fg / "labels.json").write_text(json.dumps({"subcategory": ["CAPES"], "image": ["x"]}))
    with pytest.raises(ValueError, match=r"labels\.json: needs the class attribute 'subcategory' .* item key"):
        products(str(root), "val", tok, train=False)
    os.remove(fg / "labels.json")
    with pytest.raises(FileNotFoundError, match=r"labels\.json not found: make it with python prepare\.py"):
        products(str(root), "val", tok, train=False)


def test_open_dataset_and_data_roots_errors(tmp_path, tok):
    with pytest.raises(ValueError, match=r"unknown data layout 'fashiongen'; known: \['products', 'trip"):
        data.open_dataset("fashiongen", str(tmp_path), "train", tok, S, True, CFG)
    for layout, fix in (("products", "python prepare.py fashiongen|catalogue"),
                        ("triplets", "python prepare.py fashioniq")):
        path = os.path.join(str(tmp_path), layout)
        with pytest.raises(FileNotFoundError) as e:
            data.open_dataset(layout, str(tmp_path), "train", tok, S, True, CFG)
        assert str(e.value).startswith(f"{path} not found: make it with {fix}")
        assert "python toy.py --out ROOT" in str(e.value)
        assert fix in data.LAYOUTS[layout].made_by
    names = ["xmr", "tgir", "scr"]
    assert data.data_roots("data/fashion", names) == dict.fromkeys(names, "data/fashion")
    assert data.data_roots("data/fashion, tgir=data/fiq,scr=shop", names) == {
        "xmr": "data/fashion", "tgir": "data/fiq", "scr": "shop"}
    with pytest.raises(ValueError, match=r"data spec 'tgir=a,xmr=b': the default ROOT comes first"):
        data.data_roots("tgir=a,xmr=b", names)
    for spec in ("d,fic=other", "d,tgir"):
        with pytest.raises(ValueError, match=rf"data spec '{spec}': '{spec[2:]}' is not task=ROOT.*'tgir'"):
            data.data_roots(spec, names)


# -------------------------------------------------------------------------------- tokenizer, transforms

def test_tokenizer_truncates_long_text_with_eot_last(tok):
    ids = tok(["a very long product description " * 40, "short"])
    assert ids.shape == (2, 48) and ids.dtype == torch.long
    assert ids[0, 0].item() == 49406 and ids[0, -1].item() == EOT and (ids[0] != 0).all()
    assert ids[1, 2].item() == EOT and (ids[1, 3:] == 0).all()
    assert data.get_tokenizer("ViT-B-16-quickgelu")(["x " * 200]).shape == (1, 77)


def test_transform_is_seeded_and_leaves_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    state = torch.get_rng_state()
    for aug in ("crop", "rrc"):
        a, b = (data.transform(img, S, random.Random(7), aug=aug) for _ in range(2))
        assert a.shape == (3, S, S) and torch.equal(a, b)
        assert any(not torch.equal(a, data.transform(img, S, random.Random(s), aug=aug)) for s in range(5))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(data.transform(img, S), data.transform(img, S))  # evaluation: no draw at all
    with pytest.raises(ValueError, match="aug"):
        data.transform(img, S, random.Random(0), aug="rcc")


def test_eval_view_is_what_eval_transform_sees():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    view = data.eval_view(img, S)
    assert isinstance(view, Image.Image) and view.size == (S, S)
    want = Image.fromarray(np.asarray(img.resize((37, 37), Image.BICUBIC))[2:2 + S, 2:2 + S])  # 32*256/224
    assert np.abs(np.asarray(view, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    x = data.transform(img, S)
    back = (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255
    assert (back.permute(1, 2, 0) - torch.tensor(np.asarray(view), dtype=torch.float)).abs().max() < 1e-3


def test_seed_of_is_one_stable_rule_for_every_draw():
    # the seed of a draw is a function of what identifies it, the same in every process and version of Python
    assert data.seed_of(0, "task", 0) == data.seed_of(0, "task", 0) == 8918289312210050065
    seeds = {data.seed_of(seed, what, *where) for seed in (0, 1) for what in ("task", "noise", "order", "item")
             for where in ((0,), (1,), (0, 1), (1, 0))}
    assert len(seeds) == 32 and all(0 <= s < 2 ** 63 for s in seeds)  # any part changes it
    batches = data.shard_batches(10, 2, 0, 1, seed=3, salt=1, start=0)
    keys = [next(batches) for _ in range(6)]  # 5 batches per epoch: the sixth starts epoch 1
    assert keys[0][0][1] == data.seed_of(3, "item", 1, 0, keys[0][0][0])
    assert keys[5][0][1] == data.seed_of(3, "item", 1, 1, keys[5][0][0])
