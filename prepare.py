"""Converters: the official releases, or a shop's own catalogue, -> the prepared layouts data.py reads.

Each builds its directory atomically (a failed run leaves the old output, or none) and writes report.json:
what it skipped or cleaned, with counts and a few examples. Every image it links is decoded first.
fashiongen(train_h5, val_h5, out)  -> ROOT/products  (labels: category, subcategory)
fashioniq(root, out)               -> ROOT/triplets
catalogue(file, images_dir, out)   -> ROOT/products  (CSV or JSON lines; any columns become labels)
Run through data.py: python data.py prepare fashiongen|fashioniq|catalogue ... --out ROOT
"""
import csv, itertools, os, random, shutil
import h5py
from PIL import Image

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


def write_products(out_dir, train, val, attributes, report):
    """labels.json from TRAIN's values, both splits and the report (+ what val has that train lacks)."""
    labels = {a: sorted({r["labels"][a] for r in train if a in r["labels"]}) for a in attributes}
    unknown = sorted({r["labels"].get("subcategory") for r in val} - {None} - set(labels["subcategory"]))
    report.update(classes=len(labels["subcategory"]), val_subcategories_not_in_train=unknown,
                  val_products_unknown_subcategory=sum(r["labels"].get("subcategory") in unknown
                                                       for r in val))
    for name, obj in (("labels.json", labels), ("products.train.jsonl", train), ("products.val.jsonl", val),
                      ("report.json", report)):
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
        return write_products(tmp, tr, va, ("category", "subcategory"), report)


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
        write(os.path.join(tmp, "report.json"), report)
    return report


# ---------------------------------------------------------------- a shop's own catalogue
# a catalogue's columns that are the record's own fields, never label attributes
RECORD_COLUMNS = ("id", "image", "text", "name", "description")


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


def catalogue_products(rows, columns, attrs, images_dir, report):
    """Rows -> {id: record} with absolute image paths; a product's text and labels come from its first row
    with text, later rows with its id add views. Bad rows and images are counted skips."""
    products = {}
    for n, row in enumerate(rows, 1):
        pid, where = row["id"], f"record {n} (id {row['id']!r})"
        if not pid:
            count(report, "skipped_rows_empty_id", where)
            continue
        if pid not in products:
            text = row["text"] if "text" in columns else product_text(row["name"], row["description"])
            if not text:
                count(report, "skipped_rows_empty_text", where)
                continue
            extra = {k: row[k] for k in ("name", "description") if row.get(k)}
            products[pid] = {"id": pid, "text": text, **extra, "images": [],
                             "labels": {a: row[c] for c, a in attrs.items() if row[c]}}  # "" = unknown
        for rel in filter(None, (s.strip() for s in row["image"].split(";"))):  # views: "a.jpg;b.jpg"
            path = os.path.join(images_dir, rel)
            bad = "missing" if not os.path.isfile(path) else None if decodes(path) else "undecodable"
            if bad:
                count(report, f"skipped_{bad}_images", f"{where}: {rel}")
            elif path not in products[pid]["images"]:  # a view listed twice is one view
                products[pid]["images"].append(path)
    for p in products.values():
        if not p["images"]:
            count(report, "skipped_products_without_images", p["id"])
    return {pid: p for pid, p in products.items() if p["images"]}


def catalogue(products_file, images_dir, out, val_fraction=0.1, seed=0, label="subcategory"):
    """A shop's own catalogue (CSV or JSON lines: id, image, text or name + description, any label columns)
    -> ROOT/products. The column `label` becomes the "subcategory" label: the class SCR recognises."""
    columns, rows = catalogue_rows(products_file)
    need(images_dir, "give the directory the image paths are relative to (--images)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if label in RECORD_COLUMNS:
        raise ValueError(f"--label {label}: that column is the product's {label}, not a class; pick another")
    hint = {label: "; --label picks another column", "name": " nor 'text'", "description": " nor 'text'"}
    for c in ("id", "image", *(["text"] if "text" in columns else ["name", "description"]), label):
        if c not in columns:
            raise ValueError(f"{products_file}: no column '{c}'{hint.get(c, '')} (columns: {columns})")
    # column -> attribute; a column that would overwrite an item key or the label is no attribute
    attrs = {c: "subcategory" if c == label else c for c in columns if c not in RECORD_COLUMNS}
    attrs = {c: a for c, a in attrs.items() if a not in ITEM_KEYS and (a != "subcategory" or c == label)}
    report = {"rows": len(rows), "label": label, "attributes": list(attrs.values()),
              "ignored_columns": [c for c in columns if c not in RECORD_COLUMNS and c not in attrs]}
    products = list(catalogue_products(rows, columns, attrs, images_dir, report).values())
    if not products:
        raise ValueError(f"{products_file}: no product with a text and a readable image under {images_dir}")
    val = set(random.Random(seed).sample(range(len(products)), round(val_fraction * len(products))))
    with atomic_dir(os.path.join(out, "products")) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        for i, p in enumerate(products):  # named by the product's number: safe and unique whatever the id
            srcs = p["images"]
            p["images"] = [f"images/{i:06d}_{v}{os.path.splitext(s)[1].lower()}" for v, s in enumerate(srcs)]
            for src, dst in zip(srcs, p["images"]):
                link(src, os.path.join(tmp, dst))
        splits = [[p for i, p in enumerate(products) if (i in val) == is_val] for is_val in (False, True)]
        report.update(products={"train": len(splits[0]), "val": len(splits[1])},
                      images=sum(len(p["images"]) for p in products))
        return write_products(tmp, *splits, list(attrs.values()), report)
