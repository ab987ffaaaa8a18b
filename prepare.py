"""Converters: the official releases, or a shop's own catalogue, -> the prepared layouts data.py reads.

Each builds its directory atomically (a failed run leaves the old output, or none) and writes meta.json (what
the layout holds) and report.json (what it skipped or cleaned, with counts and a few examples). Every image it
links is decoded first.
fashiongen(train_h5, val_h5, out)  -> ROOT/products  (labels: category, subcategory)
fashioniq(root, out)               -> ROOT/triplets
catalogue(file, images_dir, out)   -> ROOT/products  (CSV or JSON lines; any other column is a label)

    python prepare.py fashiongen --train TRAIN.h5 --val VALIDATION.h5 --out ROOT
    python prepare.py fashioniq --root FASHIONIQ_DIR --out ROOT
    python prepare.py catalogue --products FILE.csv|.jsonl --images DIR --out ROOT [--label subcategory]
                                [--split_column split | --val_fraction 0.1 --seed 0] [--text auto|none]
    python prepare.py upgrade ROOT          # a root prepared by an older version, brought up to date
"""
import argparse, collections, csv, itertools, json, os, random, shutil
import h5py
from PIL import Image

import cli
from data import ITEM_KEYS, atomic_dir, load_image, need, product_text, read, write

# the columns of an official FashionGen h5 file
FG_KEYS = ("input_image", "input_name", "input_description", "input_category", "input_subcategory",
           "input_productID")


def decodes(path):
    """Whether the file is an image PIL can decode fully: converters link only those."""
    try:
        load_image(path, path)
        return True
    except (FileNotFoundError, ValueError):
        return False


def link(src, dst):
    try:
        os.link(src, dst)  # no second copy of the images when source and output share a file system
    except OSError:
        shutil.copyfile(src, dst)


def count(report, reason, example, keep=3):
    """A counted skip: report[reason] += 1, and the first few examples under report["examples"][reason]."""
    report[reason] = report.get(reason, 0) + 1
    examples = report.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < keep:
        examples.append(example)


def write_products(out_dir, train, val, attributes, report, meta):
    """labels.json from TRAIN's values, both splits, meta.json and the report (+ the classes of the class
    attribute meta["class"] that val has and train lacks: those items are labelled -1 at load)."""
    labels = {a: sorted({r["labels"][a] for r in train if a in r["labels"]}) for a in attributes}
    label = meta["class"]
    unknown = sorted({r["labels"].get(label) for r in val} - {None} - set(labels[label]))
    report.update(classes=len(labels[label]), val_classes_not_in_train=unknown,
                  val_products_unknown_class=sum(r["labels"].get(label) in unknown for r in val))
    for name, obj in (("labels.json", labels), ("products.train.jsonl", train), ("products.val.jsonl", val),
                      ("meta.json", meta), ("report.json", report)):
        write(os.path.join(out_dir, name), obj)
    return report


def h5_rows(h5, a, b):
    """[(row, {key: value})] for rows a..b-1, and the rows that could not be read (a corrupt chunk, e.g. a
    truncated download). The block is read at once; only if that fails, row by row to isolate the bad ones."""
    try:
        cols = {k: h5[k][a:b] for k in FG_KEYS}
        return [(r, {k: v[r - a] for k, v in cols.items()}) for r in range(a, b)], []
    except OSError:
        good, bad = [], []
        for r in range(a, b):
            try:
                good.append((r, {k: h5[k][r] for k in FG_KEYS}))
            except OSError:
                bad.append(r)
        return good, bad


def h5_products(path, out_dir, split, chunk=256):
    """Official FashionGen h5 -> product records + a JPEG per readable row, read in chunks (never all 260k
    images at once)."""
    recs, report = [], {"products": 0, "images": 0, "ids_in_several_runs": 0, "skipped_unreadable_rows": 0}
    need(path, f"give the FashionGen {split} h5 file (--{split})")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    with h5:
        missing = [k for k in FG_KEYS if k not in h5]
        if missing:
            raise ValueError(f"{path}: required key '{missing[0]}' missing (has {sorted(h5.keys())})")
        n, shape = len(h5["input_image"]), h5["input_image"].shape
        if len(shape) != 4 or shape[3] != 3 or any(len(h5[k]) != n for k in FG_KEYS):
            raise ValueError(f"{path}: expected input_image (N,H,W,3) and N rows in each of {FG_KEYS}")
        os.makedirs(os.path.join(out_dir, "images", split))
        for a in range(0, n, chunk):
            rows, bad = h5_rows(h5, a, min(n, a + chunk))
            for r in bad:
                count(report, "skipped_unreadable_rows", r)
            for r, row in rows:
                pid = str(int(row["input_productID"].reshape(-1)[0]))
                if not recs or recs[-1]["id"] != pid:  # a new contiguous run of rows = a new product
                    # input_name -> name, ...: each cell is (1,) bytes; latin-1 never fails
                    f = {k[6:]: bytes(row[k].reshape(-1)[0]).decode("latin-1").strip()
                         for k in FG_KEYS[1:5]}
                    recs.append({"id": pid, "text": product_text(f["name"], f["description"]),
                                 "name": f["name"], "description": f["description"], "images": [],
                                 "labels": {"category": f["category"], "subcategory": f["subcategory"]}})
                image = f"images/{split}/{r}.jpg"  # named by row: unique even if an id recurs
                recs[-1]["images"].append(image)
                Image.fromarray(row["input_image"]).save(os.path.join(out_dir, image), quality=95)
    report.update(products=len(recs), images=sum(len(r["images"]) for r in recs),
                  ids_in_several_runs=len(recs) - len({r["id"] for r in recs}))
    return recs, report


def fashiongen(train, val, out):
    """The official train and validation h5 files -> ROOT/products; labels.json from train."""
    with atomic_dir(os.path.join(out, "products")) as tmp:
        tr, report_tr = h5_products(train, tmp, "train")
        va, report_va = h5_products(val, tmp, "val")
        # unknown val sub-categories are kept, with label -1 at load
        report = {"train": report_tr, "val": report_va}
        meta = {"source": "fashiongen", "class": "subcategory", "text": True}
        return write_products(tmp, tr, va, ("category", "subcategory"), report, meta)


def fashioniq(root, out):
    """The official release (captions/, image_splits/, images/) -> ROOT/triplets, cleaned and counted."""
    report = dict(whitespace_fixed=0, empty_captions=0, skipped_empty=0, skipped_missing_image=0,
                  skipped_undecodable_image=0, gallery_missing_image=0, gallery_undecodable_image=0,
                  target_added_to_gallery=0)
    fix = "--root must be the FashionIQ release (captions/, image_splits/, images/)"
    src = need(os.path.join(root, "images"), fix)
    found = {os.path.splitext(f)[0]: f for f in os.listdir(src)
             if f.lower().endswith((".jpg", ".jpeg", ".png"))}  # ASIN -> file name
    why = {}  # ASIN -> why it cannot be used: "missing_image", "undecodable_image", or None; decoded once
    def unusable(a):
        if a not in why:
            why[a] = ("missing_image" if a not in found else
                      None if decodes(os.path.join(src, found[a])) else "undecodable_image")
        return why[a]

    used = set()
    with atomic_dir(os.path.join(out, "triplets")) as tmp:
        for cat, split in itertools.product(("dress", "shirt", "toptee"), ("train", "val")):
            cpath = os.path.join(root, "captions", f"cap.{cat}.{split}.json")
            spath = os.path.join(root, "image_splits", f"split.{cat}.{split}.json")
            caps, names = read(need(cpath, fix)), read(need(spath, fix))
            gallery = []
            for a in (a.strip() for a in names):
                if unusable(a):
                    count(report, "gallery_" + unusable(a), f"{a} ({cat} {split})")
                else:
                    gallery.append(a)
            rows = []
            for i, t in enumerate(caps):
                if not isinstance(t, dict) or not {"candidate", "target", "captions"} <= t.keys():
                    raise ValueError(f"{cpath}: record {i} is not {{candidate, target, captions}}: "
                                     f"{str(t)[:80]}")
                raw = [t["candidate"], t["target"], *t["captions"]]
                cand, tgt, *texts = [" ".join(s.split()) for s in raw]  # also collapses inner whitespace
                report["whitespace_fixed"] += sum(c not in (s, "") for c, s in zip((cand, tgt, *texts), raw))
                report["empty_captions"] += texts.count("")
                texts = [c for c in texts if c]  # one empty caption: keep the other
                if not texts:
                    count(report, "skipped_empty", f"{cpath}: record {i}")
                elif unusable(cand) or unusable(tgt):
                    count(report, "skipped_" + (unusable(cand) or unusable(tgt)), f"{cpath}: record {i}")
                else:
                    rows.append({"candidate": cand, "target": tgt, "captions": texts})
                    report["target_added_to_gallery"] += tgt not in gallery  # the target must be rankable
                    if tgt not in gallery:
                        gallery.append(tgt)
                    used.add(cand)
            used.update(gallery)
            report[f"triplets.{cat}.{split}"] = len(rows)
            write(os.path.join(tmp, f"triplets.{cat}.{split}.jsonl"), rows)
            write(os.path.join(tmp, f"gallery.{cat}.{split}.json"), gallery)
        os.makedirs(os.path.join(tmp, "images"))
        for a in sorted(used):
            link(os.path.join(src, found[a]), os.path.join(tmp, "images", found[a]))
        report["images"] = len(used)
        write(os.path.join(tmp, "meta.json"), {"source": "fashioniq"})
        write(os.path.join(tmp, "report.json"), report)
    return report


# ---------------------------------------------------------------- a shop's own catalogue
# a catalogue's columns that are the record's own fields, never label attributes
RECORD_COLUMNS = ("id", "image", "text", "name", "description")
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "val"}  # --split_column's values


def catalogue_rows(path):
    """A catalogue file -> (columns, [{column: stripped str}]): CSV if it ends in .csv, else JSON lines."""
    need(path, "give the catalogue file, CSV or JSON lines (--products)")
    try:
        if path.lower().endswith(".csv"):
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM is no column
                reader = csv.DictReader(f)
                rows, columns = list(reader), list(reader.fieldnames or [])
        else:
            rows = read(path, lines=True)
            columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    except (UnicodeDecodeError, csv.Error) as e:  # e.g. a spreadsheet's Latin-1 export
        raise ValueError(f"{path}: not a UTF-8 CSV or JSON lines file ({e})") from e
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {n} is not a JSON object")
    def cell(v):  # None or a short CSV row -> "", a JSON list of views -> "a;b"
        return "" if v is None else ";".join(map(str, v)) if isinstance(v, list) else str(v).strip()
    return columns, [{c: cell(r.get(c)) for c in columns} for r in rows]


def catalogue_products(rows, text_columns, attrs, split_column, images_dir, path, report):
    """Rows -> {id: record} with absolute image paths; a product's text, labels and split come from its first
    row, later rows with its id add views. Bad rows and images are counted skips; a split value that is not
    train / val / validation / test, or a product in two splits, is an error naming the record."""
    products = {}
    for n, row in enumerate(rows, 1):
        pid, where = row["id"], f"record {n} (id {row['id']!r})"
        split = row[split_column].lower() if split_column else "train"
        if split not in SPLITS:
            raise ValueError(f"{path}: {where}: {split_column} is {row[split_column]!r}, not one of "
                             f"{sorted(SPLITS)}")
        if not pid:
            count(report, "skipped_rows_empty_id", where)
            continue
        if pid not in products:
            text = product_text(*(row[c] for c in text_columns))
            if text_columns and not text:
                count(report, "skipped_rows_empty_text", where)
                continue
            extra = {k: row[k] for k in ("name", "description") if row.get(k)}
            labels = {a: row[a] for a in attrs if row[a]}  # an empty cell: unknown
            products[pid] = {"id": pid, **({"text": text} if text_columns else {}), **extra, "images": [],
                             "labels": labels, "split": SPLITS[split]}
        elif products[pid]["split"] != SPLITS[split]:  # a product in train and val would leak
            raise ValueError(f"{path}: {where}: {split_column} is {split!r}, but an earlier row of product "
                             f"{pid!r} puts it in {products[pid]['split']!r}")
        for rel in filter(None, (s.strip() for s in row["image"].split(";"))):  # views: "a.jpg;b.jpg"
            image = os.path.join(images_dir, rel)
            bad = "missing" if not os.path.isfile(image) else None if decodes(image) else "undecodable"
            if bad:
                count(report, f"skipped_{bad}_images", f"{where}: {rel}")
            elif image not in products[pid]["images"]:  # a view listed twice is one view
                products[pid]["images"].append(image)
    for p in products.values():
        if not p["images"]:
            count(report, "skipped_products_without_images", p["id"])
    return {pid: p for pid, p in products.items() if p["images"]}


def catalogue_columns(path, columns, label, split_column, text):
    """Which columns make the text (none: image-only) and which are label attributes; missing columns are
    errors naming the file."""
    if label in RECORD_COLUMNS + ITEM_KEYS or label == split_column:
        raise ValueError(f"--label {label}: that column is not a label (the record's own {label}, or a name "
                         f"reserved for a dataset item's keys {ITEM_KEYS}); pick another")
    if text not in ("auto", "none"):
        raise ValueError(f"--text must be auto or none, got {text!r}")
    text_columns = [] if text == "none" else ["text"] if "text" in columns else \
        [c for c in ("name", "description") if c in columns]
    for c in ("id", "image", label, *([split_column] if split_column else [])):
        if c not in columns:
            hint = "; --label picks another column" if c == label else ""
            raise ValueError(f"{path}: no column '{c}'{hint} (columns: {columns})")
    attrs = [c for c in columns if c not in RECORD_COLUMNS + ITEM_KEYS and c != split_column]
    return text_columns, attrs


def catalogue(products_file, images_dir, out, val_fraction=None, seed=0, label="subcategory", split_column="",
              text="auto"):
    """A shop's own catalogue (CSV or JSON lines: id, image, a text (the column text, or name + description;
    none: image-only), any label columns) -> ROOT/products. Every label column keeps its name as an
    attribute; `label` is the class attribute that SCR, zero-shot recognition and random-100 use. The split:
    the column `split_column` (train / val / validation / test; val and test become validation), or a
    seeded random `val_fraction` of the products (default 0.1)."""
    columns, rows = catalogue_rows(products_file)
    need(images_dir, "give the directory the image paths are relative to (--images)")
    if split_column and val_fraction is not None:
        raise ValueError("give --split_column or --val_fraction, not both")
    val_fraction = 0.1 if val_fraction is None else val_fraction
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    text_columns, attrs = catalogue_columns(products_file, columns, label, split_column, text)
    report = {"rows": len(rows), "label": label, "attributes": attrs,
              "text": " + ".join(text_columns) or "none (image-only)",
              "ignored_columns": [c for c in columns if c in ITEM_KEYS and c not in RECORD_COLUMNS]}
    products = list(catalogue_products(rows, text_columns, attrs, split_column, images_dir, products_file,
                                       report).values())
    if not products:
        raise ValueError(f"{products_file}: no product with {'a text and ' * bool(text_columns)}a readable "
                         f"image under {images_dir}")
    if split_column:  # the dataset's own split, counted by the values it uses
        given = collections.Counter(r[split_column].lower() for r in rows if r["id"])
        report["split"] = {"column": split_column, **{v: n for v, n in given.items()}}
        val = {i for i, p in enumerate(products) if p["split"] == "val"}
    else:
        val = set(random.Random(seed).sample(range(len(products)), round(val_fraction * len(products))))
    with atomic_dir(os.path.join(out, "products")) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        for i, p in enumerate(products):  # named by the product's number: safe and unique whatever the id
            srcs = p.pop("images")
            p["images"] = [f"images/{i:06d}_{v}{os.path.splitext(s)[1].lower()}" for v, s in enumerate(srcs)]
            for src, dst in zip(srcs, p["images"]):
                link(src, os.path.join(tmp, dst))
            del p["split"]
        splits = [[p for i, p in enumerate(products) if (i in val) == is_val] for is_val in (False, True)]
        report.update(products={"train": len(splits[0]), "val": len(splits[1])},
                      images=sum(len(p["images"]) for p in products))
        meta = {"source": "catalogue", "class": label, "text": bool(text_columns)}
        return write_products(tmp, *splits, attrs, report, meta)


# ---------------------------------------------------------------- roots prepared by an older version
def upgrade(root):
    """Adds what a root prepared by an older version lacks: each layout's meta.json. Those versions always
    named the class attribute "subcategory" and kept texts; the source is read off report.json's format."""
    done = {}
    for layout, formats in (("products", {"rows": "catalogue", "caption_only_candidates_at_least": "toy",
                                          "train": "fashiongen"}),
                            ("triplets", {"caption_only_candidates_at_least": "toy",
                                          "target_added_to_gallery": "fashioniq"})):
        d = os.path.join(root, layout)
        if not os.path.isdir(d) or os.path.exists(os.path.join(d, "meta.json")):
            continue
        report = read(need(os.path.join(d, "report.json"), f"{d} is not a root this project prepared"))
        meta = {"source": next((s for k, s in formats.items() if k in report), "unknown")}
        if layout == "products":
            records = [r for s in ("train", "val") for r in read(os.path.join(d, f"products.{s}.jsonl"))]
            meta.update({"class": "subcategory", "text": all(r.get("text") for r in records)})
        write(os.path.join(d, "meta.json"), meta)
        done[layout] = meta
    return {"upgraded": done}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = p.add_subparsers(dest="dataset", required=True)
    fg = sets.add_parser("fashiongen", help="the official FashionGen h5 files -> ROOT/products")
    fg.add_argument("--train", required=True, help="fashiongen_256_256_train.h5")
    fg.add_argument("--val", required=True, help="fashiongen_256_256_validation.h5")
    iq = sets.add_parser("fashioniq", help="the official FashionIQ release -> ROOT/triplets")
    iq.add_argument("--root", required=True, help="the release: captions/, image_splits/, images/")
    cat = sets.add_parser("catalogue", help="a shop's own catalogue, CSV or JSON lines -> ROOT/products")
    cat.add_argument("--products", required=True, help="the catalogue file")
    cat.add_argument("--images", required=True, help="the directory its image paths are relative to")
    cat.add_argument("--split_column", default="", help="a column of train / val / validation / test: the "
                     "dataset's own split (val and test become validation)")
    cat.add_argument("--val_fraction", type=float, help="else a seeded random split by product (default 0.1)")
    cat.add_argument("--seed", type=int, default=0, help="the random split's seed")
    cat.add_argument("--label", default="subcategory", help="the class attribute: what SCR recognises, "
                     "zero-shot names and random-100 groups by")
    cat.add_argument("--text", default="auto", choices=("auto", "none"),
                     help="auto: the column text, else name + description, else none; none: image-only")
    up = sets.add_parser("upgrade", help="bring a root prepared by an older version of this project up to "
                         "date")
    up.add_argument("root", help="the prepared ROOT, upgraded in place")
    for q in (fg, iq, cat):
        q.add_argument("--out", required=True, help="the prepared ROOT")
    args = p.parse_args(argv)
    if args.dataset == "fashiongen":
        report = fashiongen(args.train, args.val, args.out)
    elif args.dataset == "fashioniq":
        report = fashioniq(args.root, args.out)
    elif args.dataset == "upgrade":
        report = upgrade(args.root)
    else:
        report = catalogue(args.products, args.images, args.out, args.val_fraction, args.seed, args.label,
                           args.split_column, args.text)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli.command_line(main)
