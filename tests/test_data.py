# Tests for data.py: the datasets on converted fixtures (built by test_prepare's format-faithful
# releases), stale or missing arrays at load, open_dataset, the arrays' texts, crops and normalisation.
import json, os, random
import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN, OPENAI_DATASET_STD as STD
from PIL import Image

import cli
import data
import prepare
from test_prepare import TRAIN_ROWS, VAL_ROWS, make_fiq, make_h5, row_colour

S, L = 32, 48  # the image size and the text context of the loaders in these tests (squares of 37 px)
EOT = 49407
CFG = {"aug": "crop"}  # the keys of a run's config the datasets read


def products(root, split, train):
    return data.open_dataset("products", root, split, L, S, train, CFG)


def mean_rgb(x):  # a uint8 (3, S, S) image -> its mean colour
    return x.float().mean((1, 2))


@pytest.fixture(scope="module")
def fg_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fg")
    prepare.fashiongen(make_h5(d / "t.h5", TRAIN_ROWS), make_h5(d / "v.h5", VAL_ROWS), str(d / "root"), S)
    return str(d / "root")


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fiq")
    prepare.fashioniq(make_fiq(d / "src"), str(d / "root"), S)
    return str(d / "root")


# -------------------------------------------------------------------------------- datasets
def test_product_dataset_train(fg_root):
    ds = products(fg_root, "train", train=True)
    assert ds.dir == os.path.join(fg_root, "products") and len(ds) == 3 and ds.unknown_labels == 0
    assert ds.attributes == ["category", "subcategory"] and ds.class_attribute == "subcategory"
    assert ds.classes == {"category": 3, "subcategory": 3, "class": 3} and ds.source == "fashiongen"
    assert ds.texts == ["Navy tee. Cotton t-shirt.", "Black boots. Leather boots.", "Red dress. Silk dress."]
    item = ds[(2, 7)]
    assert set(item) == {"image", "text", "product", "attrs", "category", "subcategory", "class"} == ds.keys
    assert item["class"] == item["subcategory"]  # the class attribute's label, under the name SCR reads
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.uint8  # normalised on the device
    assert item["text"].shape == (L,) and torch.equal(item["text"], open_clip.tokenize([ds.texts[2]], L)[0])
    assert item["subcategory"].item() == 1 and item["product"].item() == 2  # DRESSES: 1 in the sorted map
    assert item["attrs"].tolist() == [0, 1] and item["category"].item() == 0  # in ds.attributes order
    assert torch.equal(ds[(2, 7)]["image"], item["image"])  # a pure function of (index, seed)
    assert len({ds[(2, s)]["image"].float().sum().item() for s in range(12)}) > 1  # that varies with the seed
    views = {round(mean_rgb(ds[(2, s)]["image"])[0].item()) for s in range(12)}
    assert views == {row_colour(r)[0] for r in (3, 4, 5)}  # the seed picks among its 3 views (rows 3-5)
    assert torch.equal(ds[1]["image"], ds[(1, 1)]["image"])  # an int key uses seed = index
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, S, S) and batch["attrs"].shape == (2, 2)
    assert batch["subcategory"].tolist() == [2, 0]


def test_product_dataset_eval_unknown_label_and_latin1(fg_root, capsys):
    ds = products(fg_root, "val", train=False)
    out = capsys.readouterr().out
    assert "products.val.jsonl" in out and "202" in out and "label -1" in out
    assert len(ds) == 3 and ds.unknown_labels == 2  # both images of the CAPES product
    assert ds.image_product.tolist() == [0, 1, 1] and ds.products[1]["images"] == ["val/1", "val/2"]  # h5 rows
    assert ds.texts[0] == "Café shirt. Crème cotton."
    assert [ds[i]["subcategory"].item() for i in range(3)] == [2, -1, -1]
    assert ds[0]["attrs"].tolist() == [2, 2] and ds[1]["attrs"].tolist() == [-1, -1]
    for i in range(3):  # eval: item i is image i, centre-cropped from its prepared square
        assert ds.image(i).shape == (3, 37, 37)  # channels first, as the model reads them
        assert torch.equal(ds[i]["image"], data.crop(ds.image(i), S))
        assert (mean_rgb(ds[i]["image"]) - torch.tensor(row_colour(i))).abs().max() < 1.5


def test_triplet_and_gallery_datasets(fiq_root, tmp_path):
    root = fiq_root  # ROOT, holding triplets/
    ds = data.open_dataset("triplets", root, "train", L, S, True, CFG)
    assert ds.dir == os.path.join(root, "triplets") and ds.join == ", "
    assert ds.categories == ["dress", "shirt", "toptee"] and len(ds) == 3
    item = ds[(0, 3)]
    assert set(item) == {"ref", "text", "target", "category", "target_index"} == ds.keys
    assert item["ref"].shape == (3, S, S) and item["target"].shape == (3, S, S)
    assert torch.equal(item["text"], open_clip.tokenize(["is red, has dots"], L)[0])  # joined with ", "
    assert item["category"].item() == 0 and item["target_index"].item() == 1
    assert ds.triplets[0] == (0, {"candidate": "A1", "target": "A2", "captions": ["is red", "has dots"]}, 1)
    assert torch.equal(ds[1]["text"], open_clip.tokenize(["is longer"], L)[0])
    assert (ds[2]["category"].item(), ds[2]["target_index"].item()) == (1, 1)
    assert torch.equal(ds[(0, 3)]["ref"], item["ref"])
    # another join is another preparation: the text is tokenised once, when the root is prepared
    prepare.fashioniq(make_fiq(tmp_path / "src"), str(tmp_path / "and"), S, caption_join=" and ")
    joined = data.TripletDataset(os.path.join(tmp_path, "and", "triplets"), "train", L, S, False, CFG, ["dress"])
    assert len(joined) == 2 and joined.join == " and "
    assert torch.equal(joined[0]["text"], open_clip.tokenize(["is red and has dots"], L)[0])
    iq = os.path.join(root, "triplets")
    val = data.TripletDataset(iq, "val", L, S, False, CFG)
    assert len(val) == 1 and val[0]["target_index"].item() == 1  # B1 in ["A5", "B1", "A6"]
    b1 = data.square(data.load_image(os.path.join(iq, "images", "B1.png"), "B1"), S)  # the .png listed for B1
    assert np.array_equal(val.image("B1"), b1)
    gal = val.gallery("dress")
    assert gal.asins == ["A5", "B1", "A6"] and len(gal) == 3
    g = gal[1]
    assert g["index"].item() == 1 and g["image"].shape == (3, S, S)
    assert torch.equal(g["image"], val[0]["target"])  # the centre crop either way
    assert (mean_rgb(g["image"]) - torch.tensor([0., 0., 255.])).abs().max() < 1.5
    with pytest.raises(ValueError, match="no prepared image of Z9 in split val"):
        val.image("Z9")


def test_empty_task_dataset(fiq_root):
    iq = os.path.join(fiq_root, "triplets")
    with pytest.raises(ValueError, match=r"triplets\.shirt\.val\.jsonl"):
        data.TripletDataset(iq, "val", L, S, False, CFG, categories=["shirt"])
    with pytest.raises(ValueError, match=r"triplets\.\*\.test\.jsonl"):
        data.TripletDataset(iq, "test", L, S, False, CFG)
    with pytest.raises(ValueError, match=r"gallery\.toptee\.val\.json"):
        data.TripletDataset(iq, "val", L, S, False, CFG).gallery("toptee")


# -------------------------------------------------------------------------------- bad inputs at load
def test_missing_or_stale_arrays_name_the_command_that_writes_them(tmp_path):
    # loading reads no image file: what it reads is the arrays, and each mismatch names the fix
    root = tmp_path / "root"
    prepare.fashioniq(make_fiq(tmp_path / "src"), str(root), S)
    iq = root / "triplets"
    with pytest.raises(FileNotFoundError, match=rf"images\.train\.73\.u8 not found: the train images of {iq} at 73 "
                                                rf"px, for a 64 px model: write them with python prepare\.py upgrade "
                                                rf"{root} --image_size 64"):
        data.open_dataset("triplets", str(root), "train", L, 64, True, CFG)  # prepared for 32 px, asked for 64
    assert "upgraded" in prepare.upgrade(str(root), 64)  # the command the error names writes them
    assert len(data.open_dataset("triplets", str(root), "train", L, 64, True, CFG)) == 3
    images = iq / "images.train.37.u8"
    images.write_bytes(images.read_bytes()[:-3 * 37 * 37])  # one image short: a torn write
    with pytest.raises(ValueError, match=r"images\.train\.37\.u8 holds 5 images where its records list 6"):
        data.open_dataset("triplets", str(root), "train", L, S, True, CFG)
    tokens = iq / "tokens.dress.train.i32"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    assert len(data.open_dataset("triplets", str(root), "val", L, S, True, CFG)) == 1  # val is intact, train not
    with pytest.raises(ValueError, match=r"tokens\.dress\.train\.i32 holds 1 texts where its records list 2"):
        data.open_dataset("triplets", str(root), "train", L, 64, True, CFG)
    with pytest.raises(ValueError, match=r"a context of 78 tokens exceeds the prepared 77"):
        data.open_dataset("triplets", str(root), "val", 78, S, True, CFG)


def test_bad_product_records(tmp_path):
    root = tmp_path / "root"
    prepare.fashiongen(make_h5(tmp_path / "t.h5", TRAIN_ROWS), make_h5(tmp_path / "v.h5", VAL_ROWS), str(root), S)
    fg = root / "products"
    lines = open(fg / "products.train.jsonl").read().splitlines()
    (fg / "products.train.jsonl").write_text("\n".join(lines[:2] + [lines[2][:30]]))  # truncated last line
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:3: malformed JSON"):
        products(str(root), "train", train=True)
    (fg / "products.train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl: no products"):
        products(str(root), "train", train=True)
    (fg / "products.train.jsonl").write_text(json.dumps({"id": "9", "name": "x", "images": ["a.jpg"]}) + "\n")
    with pytest.raises(ValueError, match=r"products\.train\.jsonl:1: record 9 lacks one of id/text/images"):
        products(str(root), "train", train=True)
    (fg / "labels.json").write_text(json.dumps({"subcategory": ["CAPES"], "image": ["x"]}))
    with pytest.raises(ValueError, match=r"labels\.json: needs the class attribute 'subcategory' .* item key"):
        products(str(root), "val", train=False)
    os.remove(fg / "labels.json")
    with pytest.raises(FileNotFoundError, match=r"labels\.json not found: make it with python prepare\.py"):
        products(str(root), "val", train=False)


def test_open_dataset_and_data_roots_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data layout 'fashiongen'; known: \['products', 'trip"):
        data.open_dataset("fashiongen", str(tmp_path), "train", L, S, True, CFG)
    for layout, fix in (("products", "python prepare.py fashiongen|catalogue"),
                        ("triplets", "python prepare.py fashioniq")):
        path = os.path.join(str(tmp_path), layout)
        with pytest.raises(FileNotFoundError) as e:
            data.open_dataset(layout, str(tmp_path), "train", L, S, True, CFG)
        assert str(e.value).startswith(f"{path} not found: make it with {fix}")
        assert "python toy.py --out ROOT" in str(e.value)
        assert fix in data.LAYOUTS[layout].made_by
    names = ["xmr", "tgir", "scr"]
    assert cli.data_roots("data/fashion", names) == dict.fromkeys(names, "data/fashion")
    assert cli.data_roots("data/fashion, tgir=data/fiq,scr=shop", names) == {
        "xmr": "data/fashion", "tgir": "data/fiq", "scr": "shop"}
    with pytest.raises(ValueError, match=r"data spec 'tgir=a,xmr=b': the default ROOT comes first"):
        cli.data_roots("tgir=a,xmr=b", names)
    for spec in ("d,fic=other", "d,tgir"):
        with pytest.raises(ValueError, match=rf"data spec '{spec}': '{spec[2:]}' is not task=ROOT.*'tgir'"):
            cli.data_roots(spec, names)


# -------------------------------------------------------------------------------- texts, crops, normalisation
TEXTS = ["a very long product description " * 40, "short", "", "Café crème, 12 % off!"]


def test_prepared_texts_cut_at_any_context_equal_the_tokenizer():
    # tokenised once at 77 and cut at load: exactly what open_clip's tokenizer gives at that length (EOT last)
    prepared = open_clip.tokenize(TEXTS, 77).numpy().astype(np.int32)
    for length in (5, 16, 32, 48, 77):
        assert torch.equal(data.cut(prepared, length), open_clip.tokenize(TEXTS, length)), length
        assert torch.equal(data.tokenize(TEXTS, length), open_clip.tokenize(TEXTS, length))
    ids = data.cut(prepared, 48)
    assert ids.dtype == torch.int64 and ids[0, -1].item() == EOT and (ids[0] != 0).all()
    assert ids[1, 2].item() == EOT and (ids[1, 3:] == 0).all()


def test_crop_is_seeded_pure_and_leaves_every_global_rng_alone():
    square = np.random.default_rng(0).integers(0, 256, (3, 37, 37), dtype=np.uint8)
    state, py_state = torch.get_rng_state(), random.getstate()
    for aug in ("crop", "rrc"):
        a, b = (data.crop(square, S, random.Random(7), aug) for _ in range(2))
        assert a.shape == (3, S, S) and a.dtype == torch.uint8 and torch.equal(a, b)
        assert any(not torch.equal(a, data.crop(square, S, random.Random(s), aug)) for s in range(5))
    assert torch.equal(state, torch.get_rng_state()) and py_state == random.getstate()
    with pytest.raises(ValueError, match="aug"):
        data.crop(square, S, random.Random(0), "rcc")
    # RandomCrop then flip: the draws in order (top, left, flip), the pixels exactly those of the square
    rng = random.Random(3)
    top, left, flip = rng.randint(0, 5), rng.randint(0, 5), rng.random() < .5
    want = square[:, top:top + S, left:left + S][:, :, ::-1 if flip else 1]
    assert np.array_equal(data.crop(square, S, random.Random(3)).numpy(), want)


def test_the_device_sees_what_torchvision_would_have_made():
    # the square and the centre crop as torchvision's PIL path computes them, then to_tensor + normalize:
    # bit-identical to square() + crop() + normalize() of the uint8 arrays
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    big = TF.resize(img, [37, 37], TF.InterpolationMode.BICUBIC)
    want = TF.normalize(TF.to_tensor(TF.center_crop(big, [S, S])), MEAN, STD)
    assert np.array_equal(data.square(img, S), np.asarray(big).transpose(2, 0, 1))
    got = data.to_device({"image": data.crop(data.square(img, S), S)[None], "n": torch.tensor([1])}, "cpu")
    assert torch.equal(got["image"][0], want) and got["n"].dtype == torch.int64  # only uint8 is an image


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
