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
    python prepare.py upgrade ROOT          # an older root, or arrays for another --image_size
Every command takes --image_size (the model's input, default 224): images are stored once as Table 5's
square of it (256 x 256 for 224), texts tokenised once, as the arrays data.py memory-maps.
"""
import argparse, contextlib, glob, itertools, json, os, shutil, tempfile
import h5py
import numpy as np
from PIL import Image

import cli
import data
from data import load_image, need, read

# the columns of an official FashionGen h5 file
FG_KEYS = ("input_image", "input_name", "input_description", "input_category", "input_subcategory",
           "input_productID")


def write(path, obj):
    if path.endswith(".jsonl"):  # one compact object per line
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(dst):
    """Build dst in a temp dir beside it, swapped in once complete: a failed run leaves no partial dataset."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset it becomes should not be
    try:
        yield tmp
        if os.path.exists(dst):  # rename only replaces an empty dir: move the old one aside first
            os.replace(dst, tmp + ".old")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + ".old", ignore_errors=True)


def product_text(*parts):
    """The text of a product (what XMR matches, FIC writes, SCR reads): name + ". " + description (or the
    parts given), an empty part left out. Every writer of ROOT/products stores it as the record's "text"."""
    return ". ".join(s for s in parts if s)


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


# ---------------------------------------------------------------- the arrays data.py maps: written once
@contextlib.contextmanager
def image_array(path):
    """A split's image array, written square by square (add((3, side, side) uint8)) into a temporary file that
    becomes `path` once complete: raw (N, 3, side, side) uint8, as data.image_arrays maps it."""
    with open(path + ".tmp", "wb") as f:
        yield lambda square: f.write(np.ascontiguousarray(square, dtype=np.uint8).tobytes())
    os.replace(path + ".tmp", path)


def write_tokens(path, texts):  # each text tokenised once: (N, CONTEXT) int32, as data.token_arrays maps it
    data.tokenize(texts).numpy().astype(np.int32).tofile(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_squares(path, sources, image_size, what):
    """The image array at `path` from `sources`: image files, or (3, side, side) squares of another size."""
    with image_array(path) as add:
        for src in cli.progress(sources, len(sources), what):
            img = load_image(src, what) if isinstance(src, str) else Image.fromarray(src.transpose(1, 2, 0))
            add(data.square(img, image_size))


def existing_squares(dir, split, n):
    """The rows of a split's largest image array already prepared: what a root without image files
    (FashionGen) resizes for another model. None if there is none."""
    found = sorted(glob.glob(os.path.join(dir, f"images.{split}.*.u8")), key=lambda p: int(p.split(".")[-2]))
    if not found:
        return None
    s = int(found[-1].split(".")[-2])
    return np.memmap(found[-1], np.uint8, "r", shape=(n, 3, s, s))


def product_arrays(dir, image_size, images=True):
    """The arrays of ROOT/products: per split, images.<split>.<side>.u8 (every product's views in record
    order, from its image files, or resized from an array already there) and tokens.<split>.i32 (each
    product's text, unless image-only). meta.json records their format."""
    meta = read(os.path.join(dir, "meta.json"))
    for split in ("train", "val"):
        records = read(os.path.join(dir, f"products.{split}.jsonl"))
        if images:
            files = [os.path.join(dir, v) for r in records for v in r["images"]]
            on_disk = all(os.path.isfile(f) for f in files)
            current = meta.get("arrays") == data.ARRAYS  # an array already there is of this format
            sources = files if on_disk else existing_squares(dir, split, len(files)) if current else None
            if sources is None:
                raise FileNotFoundError(f"{dir}: no image files and no image array to make the {split} "
                                        f"images from: prepare the root anew with --image_size {image_size}")
            write_squares(data.images_file(dir, split, image_size), sources, image_size, f"{split} images")
        if meta["text"]:
            write_tokens(data.tokens_file(dir, split), [r["text"] for r in records])
    write(os.path.join(dir, "meta.json"), {**meta, "arrays": data.ARRAYS})


def triplet_arrays(dir, image_size, caption_join):
    """The arrays of ROOT/triplets: per split, images.<split>.<side>.u8 with its row order images.<split>.json
    (every gallery, reference and target image), and per triplets file tokens.<cat>.<split>.i32 (its
    captions joined with caption_join). meta.json records the join and their format."""
    files = {os.path.splitext(f)[0]: os.path.join(dir, "images", f)  # ASIN -> its file (.jpg, .png, ...)
             for f in os.listdir(os.path.join(dir, "images"))}
    for split in ("train", "val"):
        asins, pattern = set(), os.path.join(dir, f"triplets.*.{split}.jsonl")
        for cat in sorted(os.path.basename(p).split(".")[1] for p in glob.glob(pattern)):
            rows = read(os.path.join(dir, f"triplets.{cat}.{split}.jsonl"))
            asins |= {a for t in rows for a in (t["candidate"], t["target"])}
            asins |= set(read(os.path.join(dir, f"gallery.{cat}.{split}.json")))
            texts = [caption_join.join(t["captions"]) for t in rows]
            write_tokens(data.tokens_file(dir, f"{cat}.{split}"), texts)
        asins = sorted(asins)
        write(os.path.join(dir, f"images.{split}.json"), asins)
        missing = [a for a in asins if a not in files]
        if missing:
            raise FileNotFoundError(f"{dir}/images: no file for {missing[:3]} ({len(missing)} in all)")
        write_squares(data.images_file(dir, split, image_size), [files[a] for a in asins], image_size,
                      f"{split} images")
    meta = read(os.path.join(dir, "meta.json"))
    write(os.path.join(dir, "meta.json"), {**meta, "caption_join": caption_join, "arrays": data.ARRAYS})


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


def h5_products(path, out_dir, split, image_size, chunk=256):
    """Official FashionGen h5 -> product records, and every readable row's image into the split's image array,
    read in chunks (never all 260k images at once). The h5 holds 256 x 256 images, Table 5's square for a 224
    model: copied as they are, never re-encoded; another model's square is resized from them."""
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
        with image_array(data.images_file(out_dir, split, image_size)) as add:
            h5_into(h5, n, split, image_size, chunk, recs, add, report)
    report.update(products=len(recs), images=sum(len(r["images"]) for r in recs),
                  ids_in_several_runs=len(recs) - len({r["id"] for r in recs}))
    return recs, report


def h5_into(h5, n, split, image_size, chunk, recs, add, report):
    """The h5's rows in chunks: a new contiguous run of rows is a new product record (appended to recs), every
    readable row's image is add()-ed to the image array, every unreadable row counted in the report."""
    chunks = cli.progress(range(0, n, chunk), -(-n // chunk), f"FashionGen {split}, {chunk}-row chunks")
    for a in chunks:
        rows, bad = h5_rows(h5, a, min(n, a + chunk))
        for r in bad:
            count(report, "skipped_unreadable_rows", r)
        for r, row in rows:
            pid = str(int(row["input_productID"].reshape(-1)[0]))
            if not recs or recs[-1]["id"] != pid:  # a new contiguous run of rows = a new product
                # input_name -> name, ...: each cell is (1,) bytes; latin-1 never fails
                f = {k[6:]: bytes(row[k].reshape(-1)[0]).decode("latin-1").strip() for k in FG_KEYS[1:5]}
                recs.append({"id": pid, "text": product_text(f["name"], f["description"]),
                             "name": f["name"], "description": f["description"], "images": [],
                             "labels": {"category": f["category"], "subcategory": f["subcategory"]}})
            recs[-1]["images"].append(f"{split}/{r}")  # its h5 row: unique even if an id recurs
            pixels = row["input_image"]  # (H, W, 3) uint8: Table 5's square already if 256 x 256 for 224
            native = pixels.shape[0] == pixels.shape[1] == data.side(image_size)
            add(pixels.transpose(2, 0, 1) if native else data.square(Image.fromarray(pixels), image_size))


def fashiongen(train, val, out, image_size=224):  # the official h5 files -> ROOT/products; labels from train
    with atomic_dir(os.path.join(out, "products")) as tmp:
        tr, report_tr = h5_products(train, tmp, "train", image_size)
        va, report_va = h5_products(val, tmp, "val", image_size)
        # unknown val sub-categories are kept, with label -1 at load
        report = {"train": report_tr, "val": report_va}
        meta = {"source": "fashiongen", "class": "subcategory", "text": True}
        write_products(tmp, tr, va, ("category", "subcategory"), report, meta)
        product_arrays(tmp, image_size, images=False)  # the texts: the images are in their arrays already
        return report


def fashioniq(root, out, image_size=224, caption_join=", "):
    """The official release (captions/, image_splits/, images/) -> ROOT/triplets for a model of image_size,
    cleaned and counted; each triplet's two captions joined with caption_join (the authors' code's ", ")."""
    report = dict(whitespace_fixed=0, empty_captions=0, skipped_empty=0, skipped_missing_image=0,
                  skipped_undecodable_image=0, gallery_missing_image=0, gallery_undecodable_image=0,
                  target_added_to_gallery=0)
    fix = "--root must be the FashionIQ release (captions/, image_splits/, images/)"
    src = need(os.path.join(root, "images"), fix)
    found = {os.path.splitext(f)[0]: f for f in os.listdir(src)
             if f.lower().endswith((".jpg", ".jpeg", ".png"))}  # ASIN -> file name
    readable = {a: decodes(os.path.join(src, f))  # every image decoded once
                for a, f in cli.progress(found.items(), len(found), "images decoded")}

    def unusable(a):  # why an ASIN's image cannot be used: "missing_image", "undecodable_image", or None
        return "missing_image" if a not in found else None if readable[a] else "undecodable_image"

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
        triplet_arrays(tmp, image_size, caption_join)
    return report


# ---------------------------------------------------------------- roots prepared by an older version
def upgrade(root, image_size=224, caption_join=", "):
    """Brings a prepared root up to date for a model of image_size: each layout's meta.json where an older
    version wrote none (those always named the class attribute "subcategory" and kept texts; the source is
    read off report.json's format), then the arrays that are missing or of another format than data.ARRAYS
    (texts tokenised once, images at the model's square from the image files, or from an array already
    there)."""
    done = {}
    for layout, formats in (("products", {"rows": "catalogue", "caption_only_candidates_at_least": "toy",
                                          "train": "fashiongen"}),
                            ("triplets", {"caption_only_candidates_at_least": "toy",
                                          "target_added_to_gallery": "fashioniq"})):
        d, wrote = os.path.join(root, layout), []
        if not os.path.isdir(d):
            continue
        if not os.path.exists(os.path.join(d, "meta.json")):
            report = read(need(os.path.join(d, "report.json"), f"{d} is not a root this project prepared"))
            meta = {"source": next((s for k, s in formats.items() if k in report), "unknown")}
            if layout == "products":
                records = [r for s in ("train", "val") for r in read(os.path.join(d, f"products.{s}.jsonl"))]
                meta.update({"class": "subcategory", "text": all(r.get("text") for r in records)})
            write(os.path.join(d, "meta.json"), meta)
            wrote.append("meta.json")
        if read(os.path.join(d, "meta.json")).get("arrays") != data.ARRAYS:  # none, or of another format:
            for f in glob.glob(os.path.join(d, "images.*.u8")) + glob.glob(os.path.join(d, "tokens.*.i32")):
                os.remove(f)  # every array made anew (a file of the same size would read as wrong pixels)
        if not all(os.path.exists(data.images_file(d, s, image_size)) for s in ("train", "val")):
            if layout == "products":
                product_arrays(d, image_size)
            else:
                join = read(os.path.join(d, "meta.json")).get("caption_join", caption_join)
                triplet_arrays(d, image_size, join)
            wrote.append(f"arrays at {data.side(image_size)} px")
        if wrote:
            done[layout] = wrote
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
    up = sets.add_parser("upgrade", help="bring a prepared root up to date: meta.json, a model's arrays")
    up.add_argument("root", help="the prepared ROOT, upgraded in place")
    for q in (fg, iq, cat):
        q.add_argument("--out", required=True, help="the prepared ROOT")
    for q in (fg, iq, cat, up):
        q.add_argument("--image_size", type=int, default=224, help="the model's input size: images are "
                       "prepared as Table 5's square of it (256 x 256 for 224)")
    for q in (iq, up):
        q.add_argument("--caption_join", default=", ", help="how a triplet's captions are joined (its text)")
    args = p.parse_args(argv)
    if args.dataset == "fashiongen":
        report = fashiongen(args.train, args.val, args.out, args.image_size)
    elif args.dataset == "fashioniq":
        report = fashioniq(args.root, args.out, args.image_size, args.caption_join)
    elif args.dataset == "upgrade":
        report = upgrade(args.root, args.image_size, args.caption_join)
    else:
        from catalogue import catalogue  # catalogue.py builds on this file's writers
        report = catalogue(args.products, args.images, args.out, args.val_fraction, args.seed, args.label,
                           args.split_column, args.text, args.image_size)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli.command_line(main)
