"""A shop's own catalogue -> ROOT/products, as it comes: CSV or JSON lines, one row per product or per view,
its own split and label columns, with or without texts. The forker's converter; run it through prepare.py:

    python prepare.py catalogue --products FILE.csv|.jsonl --images DIR --out ROOT [--label subcategory]
                                [--split_column split | --val_fraction 0.1 --seed 0] [--text auto|none]
"""
import collections, csv, os, random

import cli
from data import ITEM_KEYS, need, read
from prepare import atomic_dir, count, decodes, link, product_text, product_arrays, write_products

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
    for n, row in enumerate(cli.progress(rows, len(rows), "catalogue rows"), 1):
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
              text="auto", image_size=224):
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
        write_products(tmp, *splits, attrs, report, meta)
        product_arrays(tmp, image_size)  # every view squared once for a model of image_size, texts tokenised
        return report


