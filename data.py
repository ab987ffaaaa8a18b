"""Data for FAME-ViL: one prepared layout on disk, its converters, the ToyFashion generator, datasets.

The loaders read only this layout; `prepare` writes it from the official releases, `toy` draws it.
ROOT/fashiongen/
    labels.json                 {"subcategory": [...], "category": [...]}: sorted names seen in TRAIN
                                (the toy adds "colour", "pattern", "detail")
    products.{train,val}.jsonl  {"id", "name", "description", "category", "subcategory",
                                 "images": [paths relative to ROOT/fashiongen], "attributes": {...}}
    images/...  report.json     (the converter's counts)
ROOT/fashioniq/
    images/<ASIN>.<ext>           report.json: counts of skipped / cleaned records (toy: caption-only check)
    triplets.<cat>.<split>.jsonl  {"candidate": ASIN, "target": ASIN, "captions": [str, str]}
    gallery.<cat>.<split>.json    [ASIN, ...]: the official image_splits list minus missing images
Text of a product = name + ". " + description (DESIGN §8).
Usage: python data.py toy --out ROOT [--seed 0] [--products 2800] [--size 64]
       python data.py prepare fashiongen --train TRAIN.h5 --val VALIDATION.h5 --out ROOT
       python data.py prepare fashioniq --root FASHIONIQ_DIR --out ROOT
"""
import argparse, collections, contextlib, glob, itertools, json, math, os, random, shutil, tempfile
import h5py, torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

# the columns of item["attrs"]; column 1, the sub-category, is the SCR label
ATTRIBUTES = ("category", "subcategory", "colour", "pattern", "detail")
# the columns of an official FashionGen h5 file
FG_KEYS = ("input_image", "input_name", "input_description", "input_category", "input_subcategory",
           "input_productID")


# ---------------------------------------------------------------- I/O: every error names the file
def read(path):
    """.jsonl -> list of objects, one per line; else one JSON document. Errors name the file and line."""
    jsonl = path.endswith(".jsonl")
    with open(path, encoding="utf-8") as f:
        docs = [(n, line) for n, line in enumerate(f, 1) if line.strip()] if jsonl else [(1, f.read())]
    out = []
    for n, doc in docs:
        try:
            out.append(json.loads(doc))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n + e.lineno - 1}: malformed JSON ({e.msg})") from e
    return out if jsonl else out[0]


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


def load_image(path, who):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image of {who} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode here, inside the try
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image of {who} ({e})") from e


# ---------------------------------------------------------------- ToyFashion: drawn with PIL, same layout
# category -> (text word, what a length change is about, [(sub-category, text word, drawn length p)],
#              where details sit, outline polygons in unit coordinates (y down) as a function of p).
# Sub-categories differ by p alone: a p halfway between two is ambiguous.
TOY_CATEGORIES = {
    "TOPS": ("top", "sleeves",
             [("TANK TOPS", "tank top", 0.), ("T-SHIRTS", "t-shirt", .3),
              ("SHIRTS", "long sleeve shirt", 1.)], (.42, .4),
             lambda p: [(.34, .25, .66, .25, .64, .78, .36, .78)] + [  # + sleeves, out and down
                 (.5 + s * .16, .25, .5 + s * .16, .37,
                  .5 + s * (.16 + .2 * p), .37 + .4 * p, .5 + s * (.24 + .2 * p), .29 + .4 * p)
                 for s in (-1, 1) if p > 0]),
    "DRESSES": ("dress", "",
                [("MINI DRESSES", "mini dress", .3), ("MIDI DRESSES", "midi dress", .65),
                 ("MAXI DRESSES", "maxi dress", 1.)], (.5, .3),
                lambda p: [(.4, .14, .6, .14, .58, .4, .42, .4),
                           (.42, .4, .58, .4, .6 + .18 * p, .4 + .5 * p, .4 - .18 * p, .4 + .5 * p)]),
    "SKIRTS": ("skirt", "",
               [("MINI SKIRTS", "mini skirt", .3), ("MIDI SKIRTS", "midi skirt", .65),
                ("MAXI SKIRTS", "maxi skirt", 1.)], (.5, .36),
               lambda p: [(.36, .18, .64, .18, .64, .24, .36, .24),
                          (.36, .24, .64, .24, .67 + .13 * p, .24 + .66 * p, .33 - .13 * p, .24 + .66 * p)]),
    "PANTS": ("pants", "",
              [("SHORTS", "shorts", .3), ("CROPPED PANTS", "cropped pants", .65),
               ("TROUSERS", "trousers", 1.)], (.4, .3),
              lambda p: [(.32, .14, .68, .14, .68, .24, .32, .24),
                         (.32, .24, .5, .24, .48, .24 + .68 * p, .31, .24 + .68 * p),
                         (.5, .24, .68, .24, .69, .24 + .68 * p, .52, .24 + .68 * p)]),
    "BAGS": ("bag", "strap",
             [("CLUTCHES", "clutch", 0.), ("TOTE BAGS", "tote bag", .5),
              ("SHOULDER BAGS", "shoulder bag", 1.)], (.5, .62),
             lambda p: [(.25, .45, .75, .45, .78, .82, .22, .82)] + [  # + a handle whose height is p
                 (.33, .45, .33, .45 - .4 * p, .67, .45 - .4 * p, .67, .45,
                  .63, .45, .63, .49 - .4 * p, .37, .49 - .4 * p, .37, .45)] * (p > 0)),
    "SHOES": ("shoes", "shaft",
              [("SNEAKERS", "sneakers", .1), ("ANKLE BOOTS", "ankle boots", .5),
               ("KNEE BOOTS", "knee boots", 1.)], (.38, .7),
              lambda p: [(.2, .62, .55, .62, .8, .7, .8, .8, .2, .8),
                         (.2, .62 - .5 * p, .45, .62 - .5 * p, .45, .62, .2, .62)]),
}
COLOURS = {"black": (30, 30, 30), "navy": (25, 35, 95), "red": (205, 30, 35), "green": (40, 135, 60),
           "yellow": (235, 200, 40), "pink": (240, 140, 185), "grey": (135, 135, 135), "brown": (120, 75, 40),
           "orange": (240, 130, 30), "purple": (120, 60, 165)}
# pattern -> (adjective in the name, description sentences, the two TGIR caption phrasings)
PATTERNS = {"solid": ("", ["Solid colour.", "Plain weave."], ("is plain", "without pattern")),
            "striped": ("striped", ["Striped pattern.", "Horizontal stripes."], ("has stripes", "striped")),
            "dotted": ("dotted", ["Polka dot pattern.", "Dotted print."], ("has dots", "with polka dots")),
            "checked": ("checked", ["Check pattern.", "Checked print."], ("has checks", "checkered"))}
DETAILS = {"none": "", "pocket": "Patch pocket at front.", "logo": "Logo at front.",
           "buttons": "Buttons at front.", "bow": "Bow at front."}
# what a TGIR pair may change: one or two of these attributes
CHANGES = [c for n in (1, 2) for c in itertools.combinations(("colour", "pattern", "subcategory"), n)]
BACKGROUND = (236, 236, 230)


def draw_view(cat, p, colour, pattern, detail, size, rng):
    """One picture of a garment with drawn length p; rng draws the view (scale, offset, slight turn)."""
    s, dx, dy = rng.uniform(.95, 1.15), rng.uniform(-.05, .05), rng.uniform(-.05, .05)
    angle = rng.uniform(-8, 8)
    def to_pixels(*xy):  # unit coordinates x0, y0, x1, y1, ... -> [(x0, y0), ...] in pixels of this view
        return [(size * (.5 + (x - .5) * s + dx), size * (.5 + (y - .5) * s + dy))
                for x, y in zip(xy[::2], xy[1::2])]
    mask = Image.new("L", (size, size), 0)
    for poly in TOY_CATEGORIES[cat][4](p):
        ImageDraw.Draw(mask).polygon(to_pixels(*poly), fill=255)
    # the fabric: a full square in the colour, with the pattern in an accent that contrasts with it
    accent = (245, 245, 245) if sum(COLOURS[colour]) < 400 else (35, 35, 35)
    fabric = Image.new("RGB", (size, size), COLOURS[colour])
    step = max(4, size // 8)
    f = ImageDraw.Draw(fabric)
    for k in range(step // 2, size, step):
        if pattern in ("striped", "checked"):
            f.line([(0, k), (size, k)], fill=accent, width=max(1, step // 3))
        if pattern == "checked":
            f.line([(k, 0), (k, size)], fill=accent, width=max(1, step // 3))
        if pattern == "dotted":
            for j in range(step // 2, size, step):
                f.ellipse([k - step / 5, j - step / 5, k + step / 5, j + step / 5], fill=accent)
    img = Image.new("RGB", (size, size), BACKGROUND)
    img.paste(fabric, mask=mask)
    img.paste((60, 60, 60), mask=mask.filter(ImageFilter.FIND_EDGES))  # outline, so pale garments stand out
    # the detail: boxes in units of r around the category's detail spot (x, y)
    (x, y), r = to_pixels(*TOY_CATEGORIES[cat][3])[0], max(1, .05 * size * s)
    boxes = {"none": [], "pocket": [(-1.2, -1, 1.2, 1)], "logo": [(-1, -1, 1, 1)],
             "bow": [(-1.2, -.5, 0, .5), (0, -.5, 1.2, .5)],
             "buttons": [(-.5, k - .5, .5, k + .5) for k in (-1.2, 0, 1.2)]}[detail]
    d = ImageDraw.Draw(img)
    shape = d.rectangle if detail == "pocket" else d.ellipse
    for x0, y0, x1, y1 in boxes:
        shape([x + x0 * r, y + y0 * r, x + x1 * r, y + y1 * r], fill=accent)
    return img.rotate(angle, resample=Image.BILINEAR, fillcolor=BACKGROUND)


def toy_triplets(rows, n, rng, min_fit=3):
    """Up to n FashionIQ-like triplets of one split: same category and detail, 1-2 of colour / pattern /
    adjacent sub-category changed (so "longer" names one target), kinds of change balanced. Kept only if
    >= min_fit gallery items fit the caption alone, so text alone cannot single out the target; the
    reference's other attributes then do. Returns [(category, triplet record, fit)]."""
    def attr(r, a):  # category / subcategory are top-level fields, the others sit in "attributes"
        return r["attributes"].get(a, r.get(a))
    def level(r):  # 0, 1, 2: the place of r's sub-category in its category's order of length
        return [s[0] for s in TOY_CATEGORIES[r["category"]][2]].index(r["subcategory"])

    # (category, change, values after the change) -> how many products fit the caption alone
    fit = collections.Counter((r["category"], c, tuple(attr(r, a) for a in c)) for r in rows for c in CHANGES)
    groups = collections.defaultdict(list)  # (category, detail) -> products: a pair comes from one group
    for r in rows:
        if not r["attributes"]["ambiguous_image"]:  # a blurred length would make "longer" unfair
            groups[(r["category"], attr(r, "detail"))].append(r)
    found = {ch: [] for ch in CHANGES}  # kind of change -> [(fit, ref, target, change)]
    for g in groups.values():
        for ref, tgt in itertools.permutations(g, 2):
            ch = tuple(a for a in ("colour", "pattern", "subcategory") if attr(ref, a) != attr(tgt, a))
            m = fit[(ref["category"], ch, tuple(attr(tgt, a) for a in ch))]
            if ch in found and abs(level(ref) - level(tgt)) <= 1 and m >= min_fit:
                found[ch].append((m, ref, tgt, {a: attr(tgt, a) for a in ch}))
    out, kinds = [], [ch for ch in CHANGES if found[ch]]
    while len(out) < n and kinds:
        ch = rng.choice(kinds)  # a kind of change first, then a pair: the kinds stay balanced
        m, ref, tgt, change = found[ch].pop(rng.randrange(len(found[ch])))
        kinds = [k for k in kinds if found[k]]
        noun = TOY_CATEGORIES[ref["category"]][1]
        more = "longer" if level(tgt) > level(ref) else "shorter"
        # attribute -> its change in the two annotators' styles
        phrase = {"colour": ("is " + attr(tgt, "colour"), "in " + attr(tgt, "colour")),
                  "pattern": PATTERNS[attr(tgt, "pattern")][2],
                  "subcategory": (f"has {more} {noun}" if noun else f"is {more}", f"{more} {noun}".strip())}
        # name only what changes: "is red and has dots"
        caps = [" and ".join(phrase[a][style] for a in change) for style in (0, 1)]
        triplet = {"candidate": ref["id"], "target": tgt["id"], "captions": caps, "change": change}
        out.append((ref["category"], triplet, m))
    return out


def make_toy(out, seed=0, products=2800, size=64):
    """Write ROOT/fashiongen and ROOT/fashioniq for ToyFashion. Same arguments -> byte-identical files."""
    rng = random.Random(seed)
    combos = list(itertools.product(TOY_CATEGORIES, range(3), COLOURS, PATTERNS, DETAILS))
    rng.shuffle(combos)  # 3,600 distinct attribute tuples, so each product's ground truth is well defined
    recs, omitted = {"train": [], "val": []}, {}
    with atomic_dir(os.path.join(out, "fashiongen")) as gen, atomic_dir(os.path.join(out, "fashioniq")) as iq:
        os.makedirs(os.path.join(gen, "images"))
        os.makedirs(os.path.join(iq, "images"))
        for i in range(products):
            cat, k, col, pat, det = combos[i % len(combos)]
            split = "val" if i % 28 >= 25 else "train"  # 2,500 / 300
            u, subs = rng.random(), TOY_CATEGORIES[cat][2]
            # ~30 %: the text names only the category, so SCR needs the image. Only the first such product per
            # (split, category, colour, pattern, detail) may omit it, which keeps every XMR text unique.
            omit = u < .36 and omitted.setdefault((split, cat, col, pat, det), i) == i
            ambiguous = .36 <= u < .56  # ~20 %: drawn halfway to a neighbour, so SCR needs the text
            p = subs[k][2]
            if ambiguous:  # halfway to a random neighbour
                p = (p + subs[rng.choice([j for j in (k - 1, k + 1) if 0 <= j < 3])][2]) / 2
            word = TOY_CATEGORIES[cat][0] if omit else subs[k][1]
            name = " ".join(x for x in (col.capitalize(), PATTERNS[pat][0], word) if x)  # "Red striped top"
            first = rng.choice([f"{word} in {col}.", f"{col} {word}."])
            sentences = (first[0].upper() + first[1:], rng.choice(PATTERNS[pat][1]), DETAILS[det])
            desc = " ".join(x for x in sentences if x)
            pid = f"{i:05d}"
            views = [draw_view(cat, p, col, pat, det, size, rng) for _ in range(rng.randint(1, 3))]
            images = [f"images/{pid}_{v}.png" for v in range(len(views))]  # PNG: lossless, reproducible
            for path, img in zip(images, views):
                img.save(os.path.join(gen, path), format="PNG")
            views[0].save(os.path.join(iq, "images", pid + ".png"), format="PNG")  # FashionIQ: one view
            attributes = {"colour": col, "pattern": pat, "detail": det, "text_has_subcategory": not omit,
                          "ambiguous_image": ambiguous}
            recs[split].append({"id": pid, "name": name, "description": desc, "category": cat,
                                "subcategory": subs[k][0], "images": images, "attributes": attributes})
        labels = {"category": sorted(TOY_CATEGORIES), "colour": sorted(COLOURS), "pattern": sorted(PATTERNS),
                  "subcategory": sorted(s[0] for c in TOY_CATEGORIES.values() for s in c[2]),
                  "detail": sorted(DETAILS)}
        write(os.path.join(gen, "labels.json"), labels)
        report = {"seed": seed, "caption_only_candidates_at_least": 3}
        for split, rows in recs.items():
            write(os.path.join(gen, f"products.{split}.jsonl"), rows)
            trips = toy_triplets(rows, round(.3 * len(rows)) if split == "train" else len(rows), rng)
            fits = [t[2] for t in trips]  # how many gallery items fit the caption alone
            report[split] = {"products": len(rows), "triplets": len(trips),
                             "caption_only_candidates_min": min(fits, default=0),
                             "caption_only_candidates_mean": round(sum(fits) / max(1, len(fits)), 1)}
            for c in TOY_CATEGORIES:
                triplets = [t[1] for t in trips if t[0] == c]
                gallery = [r["id"] for r in rows if r["category"] == c]
                write(os.path.join(iq, f"triplets.{c.lower()}.{split}.jsonl"), triplets)
                write(os.path.join(iq, f"gallery.{c.lower()}.{split}.json"), gallery)
        write(os.path.join(iq, "report.json"), report)
    return report


# ---------------------------------------------------------------- converters for the official releases
def h5_products(path, out_dir, split, chunk=256):
    """Official FashionGen h5 -> product records + a JPEG per row, read in chunks (never all 260k images)."""
    recs = []
    with h5py.File(path, "r") as h5:
        missing = [k for k in FG_KEYS if k not in h5]
        if missing:
            raise KeyError(f"{path}: required key '{missing[0]}' missing (has {sorted(h5.keys())})")
        n, shape = len(h5["input_image"]), h5["input_image"].shape
        if len(shape) != 4 or shape[3] != 3 or any(len(h5[k]) != n for k in FG_KEYS):
            raise ValueError(f"{path}: expected input_image (N,H,W,3) and N rows in each of {FG_KEYS}")
        os.makedirs(os.path.join(out_dir, "images", split))
        for a in range(0, n, chunk):
            cols = {k: h5[k][a:a + chunk] for k in FG_KEYS}
            for r in range(len(cols["input_image"])):
                pid = str(int(cols["input_productID"][r].reshape(-1)[0]))
                if not recs or recs[-1]["id"] != pid:  # a new contiguous run of rows = a new product
                    # input_name -> name, ...: each cell is (1,) bytes; latin-1 never fails
                    text = {k[6:]: bytes(cols[k][r].reshape(-1)[0]).decode("latin-1").strip()
                            for k in FG_KEYS[1:5]}
                    recs.append({"id": pid, **text, "images": []})
                image = f"images/{split}/{a + r}.jpg"  # named by row: unique even if an id recurs
                recs[-1]["images"].append(image)
                Image.fromarray(cols["input_image"][r]).save(os.path.join(out_dir, image), quality=95)
    report = {"products": len(recs), "images": n,
              "ids_in_several_runs": len(recs) - len({r["id"] for r in recs})}
    return recs, report


def prepare_fashiongen(train, val, out):
    with atomic_dir(os.path.join(out, "fashiongen")) as tmp:
        tr, report_tr = h5_products(train, tmp, "train")
        va, report_va = h5_products(val, tmp, "val")
        # the label map comes from TRAIN; unknown val sub-categories are kept, with label -1 at load
        labels = {k: sorted({r[k] for r in tr}) for k in ("subcategory", "category")}
        unknown = sorted({r["subcategory"] for r in va} - set(labels["subcategory"]))
        report = {"train": report_tr, "val": report_va, "classes": len(labels["subcategory"]),
                  "val_subcategories_not_in_train": unknown,
                  "val_products_unknown_subcategory": sum(r["subcategory"] in unknown for r in va)}
        for name, obj in (("labels.json", labels), ("products.train.jsonl", tr), ("products.val.jsonl", va),
                          ("report.json", report)):
            write(os.path.join(tmp, name), obj)
    return report


def prepare_fashioniq(root, out):
    report = collections.Counter(whitespace_fixed=0, empty_captions=0, skipped_empty=0,
                                 skipped_missing_image=0)
    found = {os.path.splitext(f)[0]: f for f in os.listdir(os.path.join(root, "images"))
             if f.lower().endswith((".jpg", ".jpeg", ".png"))}  # ASIN -> file name
    used = set()
    with atomic_dir(os.path.join(out, "fashioniq")) as tmp:
        for cat, split in itertools.product(("dress", "shirt", "toptee"), ("train", "val")):
            cpath = os.path.join(root, "captions", f"cap.{cat}.{split}.json")
            spath = os.path.join(root, "image_splits", f"split.{cat}.{split}.json")
            caps, names = read(cpath), read(spath)
            gallery = [a.strip() for a in names if a.strip() in found]
            report["gallery_missing_image"] += len(names) - len(gallery)
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
                    report["skipped_empty"] += 1
                elif cand not in found or tgt not in found:
                    report["skipped_missing_image"] += 1
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
            src, dst = os.path.join(root, "images", found[a]), os.path.join(tmp, "images", found[a])
            try:
                os.link(src, dst)  # no second copy of the images when source and output share a file system
            except OSError:
                shutil.copyfile(src, dst)
        report["images"] = len(used)
        write(os.path.join(tmp, "report.json"), dict(report))
    return dict(report)


# ---------------------------------------------------------------- loading: tokenizer, transforms, datasets
def get_tokenizer(model_name="ViT-B-16-quickgelu", context_length=77):
    """list[str] -> LongTensor (N, context_length); long text is cut, EOT kept last (by open_clip)."""
    import open_clip  # imported here: `toy` and `prepare` do not need its slow import
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def transform(img, size, train=False, seed=0, aug="crop"):
    """PIL image -> (3, size, size), a pure function of (img, seed) so resume is exact.
    crop: square Resize(size*256/224) -> RandomCrop -> flip (supplement, DESIGN §7);
    rrc: RandomResizedCrop(.8-1, .75-1.3) -> flip (reference code)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    rng, big, bicubic = random.Random(seed), round(size * 256 / 224), TF.InterpolationMode.BICUBIC
    if not train:
        img = TF.center_crop(TF.resize(img, [big, big], bicubic), [size, size])
    elif aug == "crop":
        top, left = rng.randint(0, big - size), rng.randint(0, big - size)
        img = TF.crop(TF.resize(img, [big, big], bicubic), top, left, size, size)
    elif aug == "rrc":  # one draw, clipped to the image (torchvision instead retries up to 10 times)
        W, H = img.size
        area = W * H * rng.uniform(.8, 1.)
        ratio = math.exp(rng.uniform(math.log(.75), math.log(1.3)))
        w, h = min(W, round(math.sqrt(area * ratio))), min(H, round(math.sqrt(area / ratio)))
        img = TF.resized_crop(img, rng.randint(0, H - h), rng.randint(0, W - w), h, w, [size, size], bicubic)
    else:
        raise ValueError(f"aug must be 'crop' or 'rrc', got {aug!r}")
    if train and rng.random() < .5:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def split_key(key):
    """A dataset key -> (index, seed string). The key is an index, or (index, seed) in training; the
    draws come from (seed, index), so the items of one step differ."""
    index, seed = key if isinstance(key, tuple) else (key, key)
    return int(index), f"{int(seed)}/{int(index)}"


class ProductDataset(Dataset):
    """ROOT/fashiongen for XMR / SCR / FIC. train: an item per product (a seeded random view); eval: an
    item per image."""

    def __init__(self, root, split, tokenizer, image_size, train, aug="crop"):
        self.dir = os.path.join(root, "fashiongen")
        self.tokenizer, self.size, self.train, self.aug = tokenizer, image_size, train, aug
        path = os.path.join(self.dir, f"products.{split}.jsonl")
        self.products, self.labels = read(path), read(os.path.join(self.dir, "labels.json"))
        if not self.products:
            raise ValueError(f"{path}: no products")
        needed = {"id", "name", "description", "category", "subcategory"}
        for n, r in enumerate(self.products, 1):
            if not r.get("images") or not needed <= r.keys():
                raise ValueError(f"{path}:{n}: record {r.get('id')} lacks one of "
                                 "id/name/description/category/subcategory/images")
        self.num_classes = len(self.labels["subcategory"])
        self.texts = [f"{r['name']}. {r['description']}" for r in self.products]
        # attribute -> {value: column code}; an attribute is a top-level field or sits in "attributes"
        where = {a: {v: i for i, v in enumerate(self.labels.get(a, []))} for a in ATTRIBUTES}
        self.attrs = torch.tensor([  # (P, len(ATTRIBUTES)), -1 = unknown
            [where[a].get(r.get(a, r.get("attributes", {}).get(a)), -1) for a in ATTRIBUTES]
            for r in self.products])
        # (I,) each image's product, and its number among the product's views
        self.image_product = torch.tensor([p for p, r in enumerate(self.products) for _ in r["images"]])
        self.image_view = [v for r in self.products for v in range(len(r["images"]))]
        unknown = self.attrs[:, 1] < 0  # (P,) sub-category not in the label map, e.g. a validation-only class
        self.unknown_labels = int(unknown.sum() if train else unknown[self.image_product].sum())  # in items
        if self.unknown_labels:
            examples = [r["id"] for r, u in zip(self.products, unknown) if u][:5]
            print(f"{path}: {self.unknown_labels} items have a sub-category not in labels.json (label -1), "
                  f"e.g. products {examples}")

    def __len__(self):
        return len(self.products) if self.train else len(self.image_product)

    def __getitem__(self, key):
        index, seed = split_key(key)
        if self.train:
            p = index
            view = random.Random(seed + "/view").randrange(len(self.products[p]["images"]))
        else:
            p, view = int(self.image_product[index]), self.image_view[index]
        rec = self.products[p]
        img = load_image(os.path.join(self.dir, rec["images"][view]), f"product {rec['id']}")
        return {"image": transform(img, self.size, self.train, seed, self.aug),  # (3, S, S)
                "text": self.tokenizer([self.texts[p]])[0],  # (L,)
                "label": self.attrs[p, 1].clone(), "product": torch.tensor(p), "attrs": self.attrs[p].clone()}


def fiq_files(fiq_dir):
    """<ASIN> -> file name, listed once: the extension differs between releases (.jpg / .png)."""
    return {os.path.splitext(f)[0]: f for f in os.listdir(os.path.join(fiq_dir, "images"))}


class TripletDataset(Dataset):
    """ROOT/fashioniq triplets of one split for TGIR: reference image + joined captions -> target image."""

    def __init__(self, root, split, tokenizer, image_size, train, aug="crop", join=", ", categories=None):
        self.dir = os.path.join(root, "fashioniq")
        self.tokenizer, self.size, self.train, self.aug, self.join = tokenizer, image_size, train, aug, join
        pattern = os.path.join(self.dir, f"triplets.*.{split}.jsonl")
        self.categories = list(categories or sorted(os.path.basename(p).split(".")[1]
                                                    for p in glob.glob(pattern)))
        self.files, self.triplets = fiq_files(self.dir), []
        paths = [os.path.join(self.dir, f"triplets.{c}.{split}.jsonl") for c in self.categories]
        for c, (cat, path) in enumerate(zip(self.categories, paths)):
            gpath = os.path.join(self.dir, f"gallery.{cat}.{split}.json")
            where = {a: i for i, a in enumerate(read(gpath))}
            for n, t in enumerate(read(path), 1):
                if t.get("target") not in where or not t.get("captions"):
                    raise ValueError(f"{path}:{n}: no captions, or target {t.get('target')} not in {gpath}")
                self.triplets.append((c, t, where[t["target"]]))  # (category, record, target's gallery index)
        if not self.triplets:
            raise ValueError(f"no triplets for split '{split}' in {paths or pattern}")

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, key):
        index, seed = split_key(key)
        c, t, target_index = self.triplets[index]
        who = f"triplet {t['candidate']}->{t['target']} ({self.categories[c]})"
        def image(asin, role):  # (3, S, S); each role draws its own augmentation
            path = os.path.join(self.dir, "images", self.files.get(asin, asin + ".jpg"))
            return transform(load_image(path, who), self.size, self.train, seed + role, self.aug)
        return {"ref": image(t["candidate"], "/ref"),
                "text": self.tokenizer([self.join.join(t["captions"])])[0],  # (L,)
                "target": image(t["target"], "/target"),
                "category": torch.tensor(c), "target_index": torch.tensor(target_index)}


class GalleryDataset(Dataset):
    """The images of gallery.<cat>.<split>.json in order, eval transform: what TGIR ranks."""

    def __init__(self, root, cat, split, image_size):
        self.dir, self.size = os.path.join(root, "fashioniq"), image_size
        path = os.path.join(self.dir, f"gallery.{cat}.{split}.json")
        self.asins, self.files = read(path), fiq_files(self.dir)
        if not self.asins:
            raise ValueError(f"{path}: empty gallery")

    def __len__(self):
        return len(self.asins)

    def __getitem__(self, i):
        a = self.asins[i]
        path = os.path.join(self.dir, "images", self.files.get(a, a + ".jpg"))
        img = load_image(path, f"gallery item {i} ({a})")
        return {"image": transform(img, self.size), "index": torch.tensor(i)}  # (3, S, S)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="draw ToyFashion")
    prep = sub.add_parser("prepare").add_subparsers(dest="dataset", required=True)
    for flag, default in (("--seed", 0), ("--products", 2800), ("--size", 64)):
        toy.add_argument(flag, type=int, default=default)
    for p, flags in ((toy, ["--out"]), (prep.add_parser("fashiongen"), ["--train", "--val", "--out"]),
                     (prep.add_parser("fashioniq"), ["--root", "--out"])):
        for flag in flags:
            p.add_argument(flag, required=True)
    args = ap.parse_args()
    if args.cmd == "toy":
        report = make_toy(args.out, args.seed, args.products, args.size)
    elif args.dataset == "fashiongen":
        report = prepare_fashiongen(args.train, args.val, args.out)
    else:
        report = prepare_fashioniq(args.root, args.out)
    print(json.dumps(report, indent=1))
