# Tests for prepare.py, the converters, on format-faithful fixtures of each release and on a shop's own
# catalogue: what they write, what they skip and count, and their errors; and prepare.py's command line.
import json, os, shutil, subprocess, sys
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import data
import catalogue
import prepare

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------- FashionGen fixture

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
    (202, b"Wool cape", b"Long cape.", b"OUTERWEAR", b"CAPES", b"id_gridfs_1"),  # CAPES: validation-only
    (202, b"Wool cape", b"Long cape.", b"OUTERWEAR", b"CAPES", b"id_gridfs_2"),
]
TEXT_KEYS = ["input_name", "input_description", "input_category", "input_subcategory", "input_pose"]


def row_colour(i):  # a distinct flat colour per row, so we can tell which row an item's image came from
    return (20 + 35 * i, 200 - 25 * i, 90)


def make_h5(path, rows, drop=None, corrupt=()):
    """The release's format; `corrupt` rows get their image chunk overwritten on disk (a torn download):
    images are then stored one row per gzip chunk, as h5py would read them from a real file."""
    n = len(rows)
    cols = {"input_image": np.stack([np.full((256, 256, 3), row_colour(i), np.uint8) for i in range(n)]),
            "input_productID": np.array([[r[0]] for r in rows], dtype=np.int64),
            "index_2": np.arange(n, dtype=np.int64)}  # 1-D in the release
    for j, k in enumerate(TEXT_KEYS, 1):
        cols[k] = np.array([[r[j]] for r in rows], dtype="S")  # (N, 1) fixed-length byte strings
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            if k != drop:
                one_row = dict(chunks=(1, 256, 256, 3), compression="gzip")
                f.create_dataset(k, data=v, **(one_row if corrupt and k == "input_image" else {}))
        where = [f["input_image"].id.get_chunk_info_by_coord((i, 0, 0, 0)) for i in corrupt]
    with open(path, "r+b") as f:
        for info in where:
            f.seek(info.byte_offset)
            f.write(b"\0" * info.size)
    return str(path)


@pytest.fixture(scope="module")
def fg_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fg")
    report = prepare.fashiongen(make_h5(d / "fashiongen_256_256_train.h5", TRAIN_ROWS),
                                make_h5(d / "fashiongen_256_256_validation.h5", VAL_ROWS), str(d / "root"))
    return str(d / "root"), report


def test_fashiongen_convert(fg_root):
    root, report = fg_root
    ok = {"ids_in_several_runs": 0, "skipped_unreadable_rows": 0}
    assert report["train"] == {"products": 3, "images": 6, **ok}
    assert report["val"] == {"products": 2, "images": 3, **ok}
    assert report["classes"] == 3
    assert report["val_classes_not_in_train"] == ["CAPES"]  # of the class attribute, the sub-category
    assert report["val_products_unknown_class"] == 1
    assert data.read(os.path.join(root, "products", "meta.json")) == {"source": "fashiongen", "class": "subcategory",
                                                                      "text": True, "arrays": data.ARRAYS}
    assert json.load(open(os.path.join(root, "products", "report.json"))) == report
    labels = json.load(open(os.path.join(root, "products", "labels.json")))
    assert labels == {"category": ["DRESSES", "SHOES", "TOPS"],
                      "subcategory": ["BOOTS", "DRESSES", "T-SHIRTS"]}
    assert list(labels) == ["category", "subcategory"]
    recs = data.read(os.path.join(root, "products", "products.train.jsonl"))
    assert [r["id"] for r in recs] == ["101", "102", "103"] and [len(r["images"]) for r in recs] == [2, 1, 3]
    assert recs[0]["name"] == "Navy tee" and recs[0]["description"] == "Cotton t-shirt."  # stripped
    assert recs[0]["text"] == "Navy tee. Cotton t-shirt." == prepare.product_text("Navy tee", "Cotton t-shirt.")
    assert recs[0]["labels"] == {"category": "TOPS", "subcategory": "T-SHIRTS"}
    val = data.read(os.path.join(root, "products", "products.val.jsonl"))
    assert val[0]["text"] == "Café shirt. Crème cotton."  # latin-1 decoded
    assert sorted(os.listdir(root)) == ["products"]  # no temp dirs left behind
    # the h5's 256 x 256 rows are Table 5's square for a 224 model: copied into the array, byte for byte, in row
    # order (no JPEG, no image file at all); the texts tokenised once at 77
    assert recs[2]["images"] == ["train/3", "train/4", "train/5"]  # the h5 rows of 103's views
    assert sorted(os.listdir(os.path.join(root, "products"))) == [
        "images.train.256.u8", "images.val.256.u8", "labels.json", "meta.json", "products.train.jsonl",
        "products.val.jsonl", "report.json", "tokens.train.i32", "tokens.val.i32"]
    for split, rows in (("train", TRAIN_ROWS), ("val", VAL_ROWS)):
        release = {"train": "train", "val": "validation"}[split]
        with h5py.File(os.path.join(os.path.dirname(root), f"fashiongen_256_256_{release}.h5")) as f:
            h5_images = f["input_image"][:]
        saved = np.fromfile(os.path.join(root, "products", f"images.{split}.256.u8"), np.uint8)
        assert np.array_equal(saved.reshape(-1, 3, 256, 256), h5_images.transpose(0, 3, 1, 2))
        texts = [r["text"] for r in data.read(os.path.join(root, "products", f"products.{split}.jsonl"))]
        tokens = np.fromfile(os.path.join(root, "products", f"tokens.{split}.i32"), np.int32).reshape(-1, 77)
        assert np.array_equal(tokens, data.tokenize(texts).numpy())



def test_h5_chunks_and_recurring_ids(tmp_path):
    rows = TRAIN_ROWS + [TRAIN_ROWS[0]]  # product 101 again after others: kept apart, and counted
    path = make_h5(tmp_path / "t.h5", rows)
    os.makedirs(tmp_path / "a"), os.makedirs(tmp_path / "b")
    small, report = prepare.h5_products(path, str(tmp_path / "a"), "train", 32, chunk=2)  # runs cross chunks
    big, _ = prepare.h5_products(path, str(tmp_path / "b"), "train", 32)
    assert small == big and [r["id"] for r in small] == ["101", "102", "103", "101"]
    assert small[3]["images"] == ["train/6"]
    a, b = (np.fromfile(tmp_path / d / "images.train.37.u8", np.uint8).reshape(-1, 3, 37 * 37) for d in "ab")
    assert np.array_equal(a, b) and len(a) == 7  # a 32 px model: every row squared to 37 x 37
    assert np.abs(a.mean(2) - [row_colour(r) for r in range(7)]).max() < 1
    assert report == {"products": 4, "images": 7, "ids_in_several_runs": 1, "skipped_unreadable_rows": 0}


def test_h5_corrupt_chunk_skips_only_its_row(tmp_path):
    # row 1 (2nd view of 101) and row 2 (102's only view) are unreadable; the chunk of 4 rows around them
    # fails as a whole, and row by row isolates them
    path = make_h5(tmp_path / "t.h5", TRAIN_ROWS, corrupt=(1, 2))
    with h5py.File(path) as f, pytest.raises(OSError):
        f["input_image"][0:4]  # the damage is real
    os.makedirs(tmp_path / "a")
    recs, report = prepare.h5_products(path, str(tmp_path / "a"), "train", 224, chunk=4)
    assert [(r["id"], r["images"]) for r in recs] == [("101", ["train/0"]), ("103", ["train/3", "train/4", "train/5"])]
    assert report == {"products": 2, "images": 4, "ids_in_several_runs": 0, "skipped_unreadable_rows": 2,
                      "examples": {"skipped_unreadable_rows": [1, 2]}}
    saved = np.fromfile(tmp_path / "a" / "images.train.256.u8", np.uint8).reshape(-1, 3, 256, 256)
    assert [tuple(x[:, 0, 0]) for x in saved] == [row_colour(r) for r in (0, 3, 4, 5)]  # the readable rows only
    full = prepare.fashiongen(path, make_h5(tmp_path / "v.h5", VAL_ROWS), str(tmp_path / "root"))
    assert full["train"]["skipped_unreadable_rows"] == 2 and full["val"]["skipped_unreadable_rows"] == 0


def test_h5_missing_key_leaves_nothing(tmp_path):
    train = make_h5(tmp_path / "train.h5", TRAIN_ROWS)
    val = make_h5(tmp_path / "val.h5", VAL_ROWS, drop="input_subcategory")
    with pytest.raises(ValueError, match=r"val\.h5.*input_subcategory"):
        prepare.fashiongen(train, val, str(tmp_path / "root"))
    assert os.listdir(tmp_path / "root") == []  # train was converted first, yet nothing half-written remains
    with pytest.raises(FileNotFoundError, match=r"nope\.h5 not found: .*--val"):
        prepare.fashiongen(train, str(tmp_path / "nope.h5"), str(tmp_path / "root"))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5: not a readable HDF5 file"):
        prepare.fashiongen(str(tmp_path / "text.h5"), val, str(tmp_path / "root"))


# -------------------------------------------------------------------------------- FashionIQ fixture

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
        ("dress", "train"): [
            {"candidate": "A1", "target": "A2", "captions": ["is red ", "  has  dots"]},  # stray whitespace
            {"candidate": "A2", "target": "A3", "captions": ["", "is longer"]},  # one empty: keep the other
            {"candidate": "A3", "target": "A1", "captions": ["", "  "]},  # both empty: skipped
            {"candidate": "A4", "target": "DEAD", "captions": ["x", "y"]}],  # dead URL: skipped
        ("dress", "val"): [{"candidate": " A5", "target": "B1", "captions": ["is blue", "darker"]}],
        ("shirt", "train"): [{"candidate": "A7", "target": "A8", "captions": ["has a collar", "collared"]}],
        ("shirt", "val"): [], ("toptee", "train"): [], ("toptee", "val"): []}
    splits = {("dress", "train"): ["A1", "A2", "A3", "A4", "DEAD"], ("dress", "val"): ["A5", "B1", "A6"],
              ("shirt", "train"): ["A7"], ("shirt", "val"): ["A7"],
              ("toptee", "train"): [], ("toptee", "val"): []}
    for (cat, split), v in caps.items():
        write_json(str(d / "captions" / f"cap.{cat}.{split}.json"), v)
        write_json(str(d / "image_splits" / f"split.{cat}.{split}.json"), splits[(cat, split)])
    return str(d)


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fiq")
    report = prepare.fashioniq(make_fiq(d / "src"), str(d / "root"))
    return str(d / "root"), report


FIQ_REPORT = {"whitespace_fixed": 3, "empty_captions": 3, "skipped_empty": 1, "skipped_missing_image": 1,
              "skipped_undecodable_image": 0, "gallery_missing_image": 1, "gallery_undecodable_image": 0,
              "target_added_to_gallery": 1, "images": 9, "triplets.dress.train": 2, "triplets.dress.val": 1,
              "triplets.shirt.train": 1, "triplets.shirt.val": 0, "triplets.toptee.train": 0,
              "triplets.toptee.val": 0}


def test_fashioniq_convert(fiq_root):
    root, report = fiq_root
    examples = report["examples"]  # a few of each counted skip, naming where it was
    assert {k: v for k, v in report.items() if k != "examples"} == FIQ_REPORT
    assert examples["gallery_missing_image"] == ["DEAD (dress train)"]
    assert examples["skipped_missing_image"][0].endswith("cap.dress.train.json: record 3")
    iq = os.path.join(root, "triplets")
    assert json.load(open(os.path.join(iq, "report.json"))) == report
    assert data.read(os.path.join(iq, "meta.json")) == {"source": "fashioniq", "caption_join": ", ", "arrays": data.ARRAYS}
    assert data.read(os.path.join(iq, "triplets.dress.train.jsonl")) == [
        {"candidate": "A1", "target": "A2", "captions": ["is red", "has dots"]},
        {"candidate": "A2", "target": "A3", "captions": ["is longer"]}]
    assert data.read(os.path.join(iq, "gallery.dress.train.json")) == ["A1", "A2", "A3", "A4"]
    assert data.read(os.path.join(iq, "gallery.shirt.train.json")) == ["A7", "A8"]  # target added
    want = [f"A{i}.jpg" for i in range(1, 9)] + ["B1.png"]
    assert sorted(os.listdir(os.path.join(iq, "images"))) == sorted(want)
    # the arrays: each split's images squared once (224 px model: 256 x 256), in the row order its json lists;
    # each triplets file's joined captions tokenised once
    assert data.read(os.path.join(iq, "images.train.json")) == ["A1", "A2", "A3", "A4", "A7", "A8"]
    assert data.read(os.path.join(iq, "images.val.json")) == ["A5", "A6", "A7", "B1"]  # shirt's gallery: A7
    squares = np.fromfile(os.path.join(iq, "images.val.256.u8"), np.uint8).reshape(-1, 3, 256, 256)
    assert np.array_equal(squares[3], data.square(Image.open(os.path.join(iq, "images", "B1.png")), 224))
    tokens = np.fromfile(os.path.join(iq, "tokens.dress.train.i32"), np.int32).reshape(-1, 77)
    assert np.array_equal(tokens, data.tokenize(["is red, has dots", "is longer"]).numpy())
    assert os.path.getsize(os.path.join(iq, "tokens.toptee.val.i32")) == 0  # a category without triplets


def test_fashioniq_undecodable_image_is_a_missing_one(tmp_path):
    src = make_fiq(tmp_path / "src")
    (tmp_path / "src" / "images" / "A3.jpg").write_bytes(b"\xff\xd8\xff truncated download")
    good = (tmp_path / "src" / "images" / "A6.jpg").read_bytes()
    (tmp_path / "src" / "images" / "A6.jpg").write_bytes(good[: len(good) // 2])  # half a JPEG
    report = prepare.fashioniq(src, str(tmp_path / "root"))
    # A3 is A2->A3's target: that triplet is skipped; A3 and A6 leave their galleries
    assert report["skipped_undecodable_image"] == 1 and report["gallery_undecodable_image"] == 2
    assert report["examples"]["gallery_undecodable_image"] == ["A3 (dress train)", "A6 (dress val)"]
    assert report["triplets.dress.train"] == 1 and report["images"] == 7
    iq = tmp_path / "root" / "triplets"
    assert data.read(str(iq / "gallery.dress.train.json")) == ["A1", "A2", "A4"]
    assert data.read(str(iq / "gallery.dress.val.json")) == ["A5", "B1"]
    assert not (iq / "images" / "A3.jpg").exists() and not (iq / "images" / "A6.jpg").exists()


def test_fashioniq_malformed_json_keeps_old_output(tmp_path):
    src = make_fiq(tmp_path / "src")
    prepare.fashioniq(src, str(tmp_path / "root"))
    before = sorted(os.listdir(tmp_path / "root" / "triplets"))
    path = os.path.join(src, "captions", "cap.shirt.val.json")
    with open(path, "w") as f:
        f.write('[{"candidate": "A7", "target": "A8", "capt')  # truncated download
    with pytest.raises(ValueError, match=r"cap\.shirt\.val\.json:1: malformed JSON"):
        prepare.fashioniq(src, str(tmp_path / "root"))
    assert sorted(os.listdir(tmp_path / "root")) == ["triplets"]  # no temp dir; the old output untouched
    assert sorted(os.listdir(tmp_path / "root" / "triplets")) == before
    write_json(path, [{"candidate": "A7", "captions": ["x"]}])  # valid JSON, wrong record
    with pytest.raises(ValueError, match=r"cap\.shirt\.val\.json: record 0"):
        prepare.fashioniq(src, str(tmp_path / "root"))
    write_json(path, [{"candidate": "A7", "target": "A7", "captions": ["same"]}])
    assert prepare.fashioniq(src, str(tmp_path / "root"))["triplets.shirt.val"] == 1  # replaces the old one
    rows = data.read(str(tmp_path / "root" / "triplets" / "triplets.shirt.val.jsonl"))
    assert rows[0]["captions"] == ["same"]
    assert sorted(os.listdir(tmp_path / "root")) == ["triplets"]
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=r"cap\.shirt\.val\.json not found: --root must be"):
        prepare.fashioniq(src, str(tmp_path / "root"))




# -------------------------------------------------------------------------------- a shop's catalogue

CSV = """id,image,name,description,subcategory,colour,product
1,a1.jpg;a2.jpg,Red tee,Cotton.,T-SHIRTS,red,x
1,a3.jpg,,,,,
2,b1.png,Blue boots,Leather.,BOOTS,blue,x
3,gone.jpg,Green hat,Wool.,HATS,green,x
4, bad.jpg ; c1.jpg ,Grey skirt,,SKIRTS,,x
5,d1.jpg,,,DRESSES,black,x
,e1.jpg,Nameless,Ghost.,COATS,white,x
"""
COLOURS = {"a1": (200, 0, 0), "a2": (0, 200, 0), "a3": (0, 0, 200), "b1": (90, 90, 90), "c1": (10, 10, 10),
           "d1": (250, 250, 250), "e1": (120, 60, 30)}


def make_catalogue(d, text=CSV, name="catalogue.csv"):
    """A catalogue file and its images (gone.jpg missing, bad.jpg not an image)."""
    os.makedirs(d / "pics", exist_ok=True)
    for stem, colour in COLOURS.items():
        Image.new("RGB", (12, 12), colour).save(d / "pics" / (stem + (".png" if stem == "b1" else ".jpg")))
    (d / "pics" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a JPEG after all")
    (d / name).write_text(text)
    return str(d / name), str(d / "pics")


def test_catalogue_csv(tmp_path):
    path, pics = make_catalogue(tmp_path)
    report = catalogue.catalogue(path, pics, str(tmp_path / "root"), val_fraction=0, image_size=16)
    assert report["examples"] == {"skipped_missing_images": ["record 4 (id '3'): gone.jpg"],
                                  "skipped_undecodable_images": ["record 5 (id '4'): bad.jpg"],
                                  "skipped_rows_empty_text": ["record 6 (id '5')"],
                                  "skipped_rows_empty_id": ["record 7 (id '')"],
                                  "skipped_products_without_images": ["3"]}
    skipped = {k: v for k, v in report.items() if k.startswith("skipped")}
    assert skipped == dict.fromkeys(report["examples"], 1)
    assert report["products"] == {"train": 3, "val": 0} and report["images"] == 5 and report["rows"] == 7
    assert report["attributes"] == ["subcategory", "colour"] and report["ignored_columns"] == ["product"]
    assert report["text"] == "name + description"
    out = tmp_path / "root" / "products"
    assert json.load(open(out / "report.json")) == report
    assert data.read(str(out / "meta.json")) == {"source": "catalogue", "class": "subcategory", "text": True,
                                                 "arrays": data.ARRAYS}
    assert data.read(str(out / "labels.json")) == {"subcategory": ["BOOTS", "SKIRTS", "T-SHIRTS"],
                                                   "colour": ["blue", "red"]}
    recs = data.read(str(out / "products.train.jsonl"))
    assert [(r["id"], r["text"], len(r["images"])) for r in recs] == [
        ("1", "Red tee. Cotton.", 3), ("2", "Blue boots. Leather.", 1), ("4", "Grey skirt", 1)]
    assert recs[0]["name"] == "Red tee" and recs[0]["description"] == "Cotton."
    assert "description" not in recs[2]
    assert recs[0]["labels"] == {"subcategory": "T-SHIRTS", "colour": "red"}  # the first row's labels
    assert recs[2]["labels"] == {"subcategory": "SKIRTS"}  # an empty cell: unknown
    assert recs[1]["images"] == ["images/000001_0.png"]  # named by the product's number, extension kept
    assert sorted(os.listdir(out / "images")) == sorted(i for r in recs for i in (os.path.basename(x)
                                                                                    for x in r["images"]))
    ds = data.open_dataset("products", str(tmp_path / "root"), "train", 32, 16, False, {"aug": "crop"})
    assert ds.attributes == ["subcategory", "colour"] and ds.classes == {"subcategory": 3, "colour": 2, "class": 3}
    assert len(ds) == 5 and ds.image_product.tolist() == [0, 0, 0, 1, 2]
    item = ds[1]  # the second view of product 1: a2, green
    assert item["image"].shape == (3, 16, 16)
    assert (mean_rgb(item["image"]) - torch.tensor(COLOURS["a2"])).abs().max() < 4
    assert torch.equal(item["text"], data.tokenize(["Red tee. Cotton."], 32)[0])
    assert (item["subcategory"].item(), item["colour"].item(), item["class"].item()) == (2, 1, 2)
    assert ds[4]["attrs"].tolist() == [1, -1]


def mean_rgb(x):  # a uint8 (3, S, S) image -> its mean colour in 0..255
    return x.float().mean((1, 2))


def test_catalogue_jsonl_label_column_and_errors(tmp_path):
    rows = [{"id": "a", "image": ["a1.jpg", "a2.jpg"], "text": "Linen shirt", "kind": "SHIRTS",
             "style": "casual", "subcategory": "not the label", "attrs": "clashes"},
            {"id": "b", "image": "b1.png", "text": "Silk tie", "kind": "TIES", "style": "formal",
             "price": 120}]
    path, pics = make_catalogue(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), "shop.jsonl")
    report = catalogue.catalogue(path, pics, str(tmp_path / "root"), val_fraction=0, label="kind")
    # every label column keeps its own name; "kind" is the class attribute; "attrs" would clash with an item key
    assert report["attributes"] == ["kind", "style", "subcategory", "price"]
    assert report["ignored_columns"] == ["attrs"] and report["images"] == 3 and report["classes"] == 2
    labels = data.read(str(tmp_path / "root" / "products" / "labels.json"))
    assert labels == {"kind": ["SHIRTS", "TIES"], "style": ["casual", "formal"], "subcategory": ["not the label"],
                      "price": ["120"]}
    assert data.read(str(tmp_path / "root" / "products" / "meta.json"))["class"] == "kind"
    recs = data.read(str(tmp_path / "root" / "products" / "products.train.jsonl"))
    assert recs[0]["labels"] == {"kind": "SHIRTS", "style": "casual", "subcategory": "not the label"}
    assert len(recs[0]["images"]) == 2
    with pytest.raises(ValueError, match=r"shop\.jsonl: no column 'season'; --label picks another column"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), label="season")
    for reserved in ("text", "class"):
        with pytest.raises(ValueError, match=rf"--label {reserved}: that column is not a label"):
            catalogue.catalogue(path, pics, str(tmp_path / "root"), label=reserved)
    no_image = CSV.replace("id,image,", "id,picture,")
    path, _ = make_catalogue(tmp_path, no_image, "noimage.csv")
    with pytest.raises(ValueError, match=r"noimage\.csv: no column 'image' \(columns: \['id', 'picture'"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"))
    path, _ = make_catalogue(tmp_path, "id,image,title\n1,a1.jpg,Tee\n", "notext.csv")
    with pytest.raises(ValueError, match=r"notext\.csv: no column 'subcategory'; --label picks another column"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"))
    (tmp_path / "latin1.csv").write_bytes("id,image,text\n1,a1.jpg,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: not a UTF-8 CSV or JSON lines file"):
        catalogue.catalogue(str(tmp_path / "latin1.csv"), pics, str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match=r"nope\.csv not found: .*--products"):
        catalogue.catalogue(str(tmp_path / "nope.csv"), pics, str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match=r"nowhere not found: .*--images"):
        catalogue.catalogue(path, str(tmp_path / "nowhere"), str(tmp_path / "root"))
    with pytest.raises(ValueError, match=r"--val_fraction must be in \[0, 1\), got 1\.5"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), val_fraction=1.5)
    assert sorted(os.listdir(tmp_path / "root")) == ["products"]  # the first output, kept by the failures


def test_catalogue_split_by_product_seeded(tmp_path):
    # 40 products, every third shown in two rows (a view per row): a product's views stay in one split
    lines = ["id,image,text,subcategory"] + [f"p{i},{s},Item {i},K{i % 4}" for i in range(40)
                                              for s in (["a1.jpg", "a2.jpg"] if i % 3 == 0 else ["b1.png"])]
    path, pics = make_catalogue(tmp_path, "\n".join(lines) + "\n")
    def split(seed, fraction=.25, out="root"):
        catalogue.catalogue(path, pics, str(tmp_path / out), val_fraction=fraction, seed=seed)
        files = [tmp_path / out / "products" / f"products.{s}.jsonl" for s in ("train", "val")]
        return [[(r["id"], len(r["images"])) for r in data.read(str(f))] for f in files]
    train, val = split(0)
    assert len(val) == 10 and len(train) == 30  # round(0.25 * 40) products, not rows
    assert sorted(train + val) == sorted((f"p{i}", 2 if i % 3 == 0 else 1) for i in range(40))
    assert [int(i[1:]) for i, _ in train] == sorted(int(i[1:]) for i, _ in train)  # the file's order kept
    assert split(0, out="again") == [train, val]  # deterministic
    assert split(1, out="other")[1] != val  # the seed picks
    assert len(split(0, .1, "tenth")[1]) == 4


def test_catalogue_official_split_column(tmp_path):
    # the dataset's own split: train stays train, val / validation / test become validation (counted apart)
    lines = ["id,image,text,subcategory,split"] + [f"p{i},b1.png,Item {i},K{i % 3},{s}" for i, s in
                                                   enumerate(["train", "TEST", "val", "train", "validation",
                                                              "train", "test", "train"])]
    lines.insert(2, "p0,a1.jpg,,,train")  # a second view of p0, in the same split
    path, pics = make_catalogue(tmp_path, "\n".join(lines) + "\n")
    report = catalogue.catalogue(path, pics, str(tmp_path / "root"), split_column="split")
    assert report["split"] == {"column": "split", "train": 5, "test": 2, "val": 1, "validation": 1}  # rows
    assert report["products"] == {"train": 4, "val": 4} and "split" not in report["attributes"]
    files = [tmp_path / "root" / "products" / f"products.{s}.jsonl" for s in ("train", "val")]
    assert [[r["id"] for r in data.read(str(f))] for f in files] == [["p0", "p3", "p5", "p7"],
                                                                      ["p1", "p2", "p4", "p6"]]
    assert all("split" not in r["labels"] for f in files for r in data.read(str(f)))
    with pytest.raises(ValueError, match="give --split_column or --val_fraction, not both"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), split_column="split", val_fraction=0.2)
    path, _ = make_catalogue(tmp_path, "\n".join(lines[:3] + ["p9,b1.png,Item 9,K0,holdout"]) + "\n", "odd.csv")
    with pytest.raises(ValueError, match=r"odd\.csv: record 3 \(id 'p9'\): split is 'holdout', not one of"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), split_column="split")
    path, _ = make_catalogue(tmp_path, "\n".join(lines[:3] + ["p0,c1.jpg,,,val"]) + "\n", "leak.csv")
    with pytest.raises(ValueError, match=r"leak\.csv: record 3 \(id 'p0'\): split is 'val', but an earlier row of "
                                         r"product 'p0' puts it in 'train'"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), split_column="split")
    with pytest.raises(ValueError, match=r"no column 'season'"):
        catalogue.catalogue(path, pics, str(tmp_path / "root"), split_column="season")


@pytest.mark.parametrize("how", ["no text column", "--text none"])
def test_catalogue_image_only(tmp_path, how):
    # no invented text: products keep no "text", items hold none, the root says so in meta.json
    csv_text = "id,image,type\n1,a1.jpg;a2.jpg,tee\n2,b1.png,boot\n3,d1.jpg,\n" if how == "no text column" else CSV
    path, pics = make_catalogue(tmp_path, csv_text)
    label = "type" if how == "no text column" else "subcategory"
    report = catalogue.catalogue(path, pics, str(tmp_path / "root"), val_fraction=0, label=label, image_size=16,
                               text="auto" if how == "no text column" else "none")
    out = tmp_path / "root" / "products"
    assert report["text"] == "none (image-only)" and data.read(str(out / "meta.json"))["text"] is False
    recs = data.read(str(out / "products.train.jsonl"))
    assert recs and all("text" not in r for r in recs)
    assert len(recs) == (3 if how == "no text column" else 4)  # --text none keeps the row without text (id 5)
    assert "skipped_rows_empty_text" not in report
    ds = data.open_dataset("products", str(tmp_path / "root"), "train", 32, 16, True, {"aug": "crop"})
    assert "text" not in ds[0] and "text" not in ds.keys and ds.has_text is False
    with pytest.raises(ValueError, match=r"task xmr reads \['text'\], which .*products does not hold .*image-only"):
        data.open_datasets({"xmr": "products"}, {"xmr": str(tmp_path / "root")}, "train", 32, 16, True,
                           {"aug": "crop"}, keys={"xmr": ("image", "text")})


@pytest.mark.slow
def test_upgrade_an_older_root(tmp_path):
    # a root as an older version prepared it (image files, no meta.json, no arrays): loading names the command
    # that upgrades it; the command writes what is missing, for the model's size, and then has nothing to do
    path, pics = make_catalogue(tmp_path)
    root = tmp_path / "old"
    catalogue.catalogue(path, pics, str(root), val_fraction=0, image_size=16)
    new = {f: (root / "products" / f).read_bytes() for f in os.listdir(root / "products") if f.endswith((".u8", ".i32"))}
    for f in ("meta.json", "images.train.18.u8", "images.val.18.u8", "tokens.train.i32", "tokens.val.i32"):
        os.remove(root / "products" / f)
    with pytest.raises(FileNotFoundError, match=rf"{root}/products was prepared by an older version: "
                                                rf"python prepare\.py upgrade {root} --image_size 16"):
        data.open_dataset("products", str(root), "train", 32, 16, True, {"aug": "crop"})
    r = run_cli("upgrade", str(root), "--image_size", "16")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"upgraded": {"products": ["meta.json", "arrays at 18 px"]}}
    assert data.read(str(root / "products" / "meta.json")) == {"source": "catalogue", "class": "subcategory",
                                                               "text": True, "arrays": data.ARRAYS}
    for f in ("images.train.18.u8", "images.val.18.u8", "tokens.train.i32"):  # what the converter would write
        assert (root / "products" / f).read_bytes() == new[f], f
    assert json.loads(run_cli("upgrade", str(root), "--image_size", "16").stdout) == {"upgraded": {}}
    # arrays of another format (say a layout of an older version): refused, then made anew by the command
    meta = data.read(str(root / "products" / "meta.json"))
    prepare.write(str(root / "products" / "meta.json"), {**meta, "arrays": "images uint8 (N, side, side, 3)"})
    with pytest.raises(ValueError, match=r"holds arrays of another format \('images uint8 \(N, side, side, 3\)', not "
                                         rf"'images uint8 \(N, 3, side, side\).*python prepare\.py upgrade {root} "):
        data.open_dataset("products", str(root), "train", 32, 16, True, {"aug": "crop"})
    (root / "products" / "images.train.37.u8").write_bytes(b"stale")  # another side's stale array: removed too
    assert prepare.upgrade(str(root), 16) == {"upgraded": {"products": ["arrays at 18 px"]}}
    assert not (root / "products" / "images.train.37.u8").exists()
    assert (root / "products" / "images.train.18.u8").read_bytes() == new["images.train.18.u8"]


def test_upgrade_without_image_files_resizes_the_prepared_squares(tmp_path, fg_root):
    # FashionGen keeps no image file: another model's squares come from the 256 x 256 rows already prepared
    root = tmp_path / "fg"
    shutil.copytree(fg_root[0], root)
    assert prepare.upgrade(str(root), 32) == {"upgraded": {"products": ["arrays at 37 px"]}}
    rows = np.fromfile(root / "products" / "images.val.256.u8", np.uint8).reshape(-1, 3, 256, 256)
    small = np.fromfile(root / "products" / "images.val.37.u8", np.uint8).reshape(-1, 3, 37, 37)
    assert np.array_equal(small, np.stack([data.square(Image.fromarray(r.transpose(1, 2, 0)), 32) for r in rows]))
    assert len(data.open_dataset("products", str(root), "val", 32, 32, False, {"aug": "crop"})) == 3


# -------------------------------------------------------------------------------- prepare.py's command line

def run_cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT_DIR, "prepare.py"), *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_catalogue(tmp_path):
    path, pics = make_catalogue(tmp_path)
    missing = str(tmp_path / "missing.csv")
    r = run_cli("catalogue", "--products", missing, "--images", pics, "--out", str(tmp_path / "root"))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and missing in r.stderr and "--products" in r.stderr
    r = run_cli("catalogue", "--products", path, "--images", pics, "--out", str(tmp_path / "root"),
                "--val_fraction", "0.5", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["products"] == {"train": 1, "val": 2}
    assert sorted(os.listdir(tmp_path / "root")) == ["products"]
