"""Data for FAME-ViL: the prepared layouts on disk and the datasets that read them.

A prepared root holds one directory per layout, named by it; the loaders read only these.
ROOT/products/   XMR, SCR, FIC, CMA-CLIP (FashionGen, a shop's own catalogue, ToyFashion)
    meta.json                   {"source", "class": the class attribute (what SCR recognises, zero-shot names
                                 and random-100 groups by), "text": whether products have texts}
    labels.json                 {attribute: [sorted values seen in TRAIN]}, attributes in a fixed order
    products.{train,val}.jsonl  {"id", "text" (unless image-only), "images": [paths relative to
                                 ROOT/products], "labels": {attribute: value}, optional "name", "description"}
    images/...  report.json     (what the converter skipped or cleaned, with counts)
ROOT/triplets/   TGIR (FashionIQ, ToyFashion)
    meta.json                     {"source"}
    triplets.<cat>.<split>.jsonl  {"candidate": ASIN, "target": ASIN, "captions": [str, ...]}
    gallery.<cat>.<split>.json    [ASIN, ...]: the official image_splits list minus unusable images
    images/<ASIN>.<ext>  report.json
The converters that write these layouts live in prepare.py (python prepare.py --help), ToyFashion in toy.py.
"""
import contextlib, glob, hashlib, itertools, json, math, os, random, shutil, tempfile
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

# a product item's own keys ("class": the label of the root's class attribute); no attribute may be named so
ITEM_KEYS = ("image", "text", "product", "attrs", "class")


# ---------------------------------------------------------------- I/O: every error names the file
def read(path, lines=None):
    """.jsonl (or lines=True) -> list of objects, one per line; else one JSON document. Errors name the
    file and line."""
    lines = path.endswith(".jsonl") if lines is None else lines
    with open(path, encoding="utf-8") as f:
        docs = [(n, line) for n, line in enumerate(f, 1) if line.strip()] if lines else [(1, f.read())]
    out = []
    for n, doc in docs:
        try:
            out.append(json.loads(doc))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n + e.lineno - 1}: malformed JSON ({e.msg})") from e
    return out if lines else out[0]


def write(path, obj):
    if path.endswith(".jsonl"):  # one compact object per line
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def need(path, fix):
    """A missing input is a FileNotFoundError naming it and what would supply it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {fix}")
    return path


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


def prepared(path, layout):
    """A path of a prepared layout, or a FileNotFoundError naming it and the command that makes it."""
    return need(path, f"make it with {layout.made_by}")


def read_meta(dir):
    """A layout's meta.json; a root prepared before it existed gets the command that upgrades it."""
    root = os.path.dirname(os.path.abspath(dir))
    fix = f"{dir} was prepared by an older version of this project: python prepare.py upgrade {root}"
    return read(need(os.path.join(dir, "meta.json"), fix))


def load_image(path, who):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image of {who} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode here, inside the try
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image of {who} ({e})") from e


def product_text(*parts):
    """The text of a product (what XMR matches, FIC writes, SCR reads): name + ". " + description (or the
    parts given), an empty part left out. Every writer of ROOT/products stores it as the record's "text"."""
    return ". ".join(s for s in parts if s)


# ---------------------------------------------------------------- loading: tokenizer, transforms, datasets
def get_tokenizer(model_name, context_length=77):
    """list[str] -> LongTensor (N, context_length); long text is cut, EOT kept last (by open_clip)."""
    import open_clip  # imported here: the converters do not need its slow import
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def square(img, size):
    """The resize both crops start from: a square of size * 256/224 (bicubic), as CLIP's preprocessing."""
    big = round(size * 256 / 224)
    return TF.resize(img, [big, big], TF.InterpolationMode.BICUBIC)


def eval_view(img, size):
    """What the model sees at evaluation: the square resize, centre-cropped to size x size (a PIL image)."""
    return TF.center_crop(square(img, size), [size, size])


def transform(img, size, rng=None, aug="crop"):
    """PIL image -> (3, size, size). Training (an item's random.Random `rng`, which it draws from in a fixed
    order, so the result is a pure function of the item's seed and resume is exact):
    crop: the square resize -> RandomCrop -> flip (the paper's supplement);
    rrc: RandomResizedCrop(.8-1, .75-1.3) -> flip (reference code). Evaluation (rng None): eval_view."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    train = rng is not None
    if not train:
        img = eval_view(img, size)
    elif aug == "crop":
        img = square(img, size)
        top, left = rng.randint(0, img.height - size), rng.randint(0, img.width - size)
        img = TF.crop(img, top, left, size, size)
    elif aug == "rrc":  # one draw, clipped to the image (torchvision instead retries up to 10 times)
        W, H = img.size
        area = W * H * rng.uniform(.8, 1.)
        ratio = math.exp(rng.uniform(math.log(.75), math.log(1.3)))
        w, h = min(W, round(math.sqrt(area * ratio))), min(H, round(math.sqrt(area / ratio)))
        img = TF.resized_crop(img, rng.randint(0, H - h), rng.randint(0, W - w), h, w, [size, size],
                              TF.InterpolationMode.BICUBIC)
    else:
        raise ValueError(f"aug must be 'crop' or 'rrc', got {aug!r}")
    if train and rng.random() < .5:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def seed_of(*parts):
    """The seed of one random draw, from what identifies it: the run's seed, the draw's purpose and where it
    happens, e.g. (seed, "task", step) or (seed, "item", task, epoch, index). Every random choice of a run is
    such a pure function, so ranks agree without talking and a resumed run continues exactly; hashing keeps
    draws that differ in any part unrelated. -> an int in [0, 2**63)"""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def split_key(key):
    """A dataset key -> (index, the random.Random of its draws). A key is (index, seed) from shard_batches,
    or an index (its own seed). In training an item draws its view, crop and flip from it, in that order."""
    index, seed = key if isinstance(key, tuple) else (key, key)
    return int(index), random.Random(int(seed))


def shard_batches(n, batch, rank, world, seed, salt, start):
    """Endless batches of (index, augmentation seed) for this rank, from global batch number `start`.
    Order and augmentation are pure functions of (seed, salt, epoch, index): a checkpoint only needs
    how many batches each task has consumed. The last partial global batch of an epoch is dropped."""
    per_epoch = n // (batch * world)
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} samples is smaller than one global batch of {batch * world}")
    perm_epoch, perm = -1, None
    for b in itertools.count(start):
        epoch, j = divmod(b, per_epoch)
        if epoch != perm_epoch:  # a new epoch: a new order
            perm_epoch = epoch
            g = torch.Generator().manual_seed(seed_of(seed, "order", salt, epoch))
            perm = torch.randperm(n, generator=g)
        first = (j * world + rank) * batch  # global batch j is ranks 0..world-1's slices, in order
        idx = perm[first:first + batch].tolist()
        yield [(i, seed_of(seed, "item", salt, epoch, i)) for i in idx]


def swap_modality(batch, fraction, seed, step):  # train.py applies it to the tasks whose rows say noisy
    """CMA-CLIP's noisy modality: `fraction` of the samples get another sample's text (half of them)
    or image (the other half); labels stay. A pure function of (seed, step), like every draw."""
    g = torch.Generator().manual_seed(seed_of(seed, "noise", step))
    B = len(batch["text"])
    u = torch.rand(B, generator=g)
    other = (torch.arange(B) + torch.randint(1, B, (B,), generator=g)) % B  # never the sample itself
    text, image = u < fraction / 2, (u >= fraction / 2) & (u < fraction)
    return dict(batch, text=torch.where(text[:, None], batch["text"][other], batch["text"]),
                image=torch.where(image[:, None, None, None], batch["image"][other], batch["image"]))


def stream(dataset, batches, workers):
    """An endless iterator of collated batches: `batches` (shard_batches) picks the items, `workers`
    processes load them."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                            persistent_workers=workers > 0,
                                            pin_memory=torch.cuda.is_available()))


class ProductDataset(Dataset):
    """ROOT/products for XMR / SCR / FIC / CMA-CLIP. train: an item per product (a seeded random view);
    eval: an item per image. An item holds each label under its attribute's name, the class attribute's also
    as "class", and all of them as attrs; "text" unless the root is image-only."""
    made_by = "python prepare.py fashiongen|catalogue ... --out ROOT, or python toy.py --out ROOT"

    def __init__(self, dir, split, tokenizer, image_size, train, cfg):
        self.dir, self.tokenizer, self.size, self.train = dir, tokenizer, image_size, train
        self.aug = cfg["aug"]
        path, lpath = os.path.join(dir, f"products.{split}.jsonl"), os.path.join(dir, "labels.json")
        self.products, self.labels = read(prepared(path, self)), read(prepared(lpath, self))
        meta = read_meta(dir)
        self.source, self.class_attribute, self.has_text = meta["source"], meta["class"], meta["text"]
        if not self.products:
            raise ValueError(f"{path}: no products")
        needed = ("id", "text", "images") if self.has_text else ("id", "images")
        for n, r in enumerate(self.products, 1):
            r = r if isinstance(r, dict) else {}
            if not all(r.get(k) for k in needed):
                raise ValueError(f"{path}:{n}: record {r.get('id')} lacks one of {'/'.join(needed)}")
        self.attributes = list(self.labels)
        if set(self.attributes) & set(ITEM_KEYS) or self.class_attribute not in self.labels:
            raise ValueError(f"{lpath}: needs the class attribute {self.class_attribute!r} (meta.json) and "
                             f"no attribute named like an item key {ITEM_KEYS}")
        code = {a: {v: i for i, v in enumerate(vs)} for a, vs in self.labels.items()}  # value -> class
        self.labels["class"] = self.labels[self.class_attribute]  # the alias every item carries too
        self.classes = {a: len(v) for a, v in self.labels.items()}
        self.texts = [r.get("text", "") for r in self.products]
        self.attrs = torch.tensor([[code[a].get(r.get("labels", {}).get(a), -1) for a in self.attributes]
                                   for r in self.products])  # (P, A), -1 = unknown
        # (I,) each image's product, and its number among the product's views
        self.image_product = torch.tensor([p for p, r in enumerate(self.products) for _ in r["images"]])
        self.image_view = [v for r in self.products for v in range(len(r["images"]))]
        unknown = self.attrs[:, self.column("class")] < 0  # (P,) e.g. a val-only class
        self.unknown_labels = int(unknown.sum() if train else unknown[self.image_product].sum())  # in items
        if self.unknown_labels:
            examples = [r["id"] for r, u in zip(self.products, unknown) if u][:5]
            print(f"{path}: {self.unknown_labels} items have no {self.class_attribute} in labels.json "
                  f"(label -1), e.g. products {examples}")
        self.keys = {"image", "product", "attrs", "class", *self.attributes, *["text"] * self.has_text}

    def column(self, attribute):  # the column of attrs that holds an attribute ("class": the class attribute)
        return self.attributes.index(self.class_attribute if attribute == "class" else attribute)

    def __len__(self):
        return len(self.products) if self.train else len(self.image_product)

    def image_path(self, i):
        """The file of image i (eval item i)."""
        rec = self.products[self.image_product[i]]
        return os.path.join(self.dir, rec["images"][self.image_view[i]])

    def __getitem__(self, key):
        index, rng = split_key(key)
        if self.train:
            p = index
            view = rng.randrange(len(self.products[p]["images"]))
            path = os.path.join(self.dir, self.products[p]["images"][view])
        else:
            p, path = int(self.image_product[index]), self.image_path(index)
        img = load_image(path, f"product {self.products[p]['id']}")
        attrs = self.attrs[p].clone()  # (A,) a copy: a worker would otherwise send all of self.attrs
        item = {"image": transform(img, self.size, rng if self.train else None, self.aug),  # (3, S, S)
                "product": torch.tensor(p), "attrs": attrs, "class": attrs[self.column("class")],
                **dict(zip(self.attributes, attrs))}
        if self.has_text:
            item["text"] = self.tokenizer([self.texts[p]])[0]  # (L,)
        return item


class TripletDataset(Dataset):
    """ROOT/triplets of one split for TGIR: reference image + joined captions -> target image."""
    made_by = "python prepare.py fashioniq --root DIR --out ROOT, or python toy.py --out ROOT"
    labels, classes = {}, {}  # no label attributes: nothing to classify
    keys = {"ref", "text", "target", "category", "target_index"}

    def __init__(self, dir, split, tokenizer, image_size, train, cfg, categories=None):
        self.dir, self.split, self.tokenizer, self.size, self.train = dir, split, tokenizer, image_size, train
        self.aug, self.join = cfg["aug"], cfg["caption_join"]
        self.source = read_meta(dir)["source"]
        # <ASIN> -> file name, listed once: the extension differs between releases (.jpg / .png)
        images = prepared(os.path.join(dir, "images"), self)
        self.files = {os.path.splitext(f)[0]: f for f in os.listdir(images)}
        pattern = os.path.join(dir, f"triplets.*.{split}.jsonl")
        self.categories = list(categories or sorted(os.path.basename(p).split(".")[1]
                                                    for p in glob.glob(pattern)))
        paths, self.triplets = [os.path.join(dir, f"triplets.{c}.{split}.jsonl") for c in self.categories], []
        for c, (cat, path) in enumerate(zip(self.categories, paths)):
            gpath = os.path.join(dir, f"gallery.{cat}.{split}.json")
            where = {a: i for i, a in enumerate(read(prepared(gpath, self)))}
            for n, t in enumerate(read(prepared(path, self)), 1):
                t = t if isinstance(t, dict) else {}
                if t.get("target") not in where or not t.get("captions"):
                    raise ValueError(f"{path}:{n}: no captions, or target {t.get('target')} not in {gpath}")
                self.triplets.append((c, t, where[t["target"]]))  # (category, record, target's gallery index)
        if not self.triplets:
            raise ValueError(f"no triplets for split '{split}' in {paths or pattern}")

    def __len__(self):
        return len(self.triplets)

    def image_path(self, asin):
        """The file listed for this ASIN, whatever its extension (none listed: <ASIN>.jpg, which the
        loading error then names)."""
        return os.path.join(self.dir, "images", self.files.get(asin, asin + ".jpg"))

    def gallery(self, cat):
        return GalleryDataset(self, cat)

    def __getitem__(self, key):
        index, rng = split_key(key)
        c, t, target_index = self.triplets[index]
        who = f"triplet {t['candidate']}->{t['target']} ({self.categories[c]})"
        def image(asin):  # (3, S, S); the reference draws its crop and flip first, then the target
            img = load_image(self.image_path(asin), who)
            return transform(img, self.size, rng if self.train else None, self.aug)
        ref = image(t["candidate"])
        return {"ref": ref, "text": self.tokenizer([self.join.join(t["captions"])])[0],  # (L,)
                "target": image(t["target"]),
                "category": torch.tensor(c), "target_index": torch.tensor(target_index)}


class GalleryDataset(Dataset):
    """The images of gallery.<cat>.<split>.json in order, eval transform: what TGIR ranks."""

    def __init__(self, triplets, cat):
        self.image_path, self.size = triplets.image_path, triplets.size
        path = os.path.join(triplets.dir, f"gallery.{cat}.{triplets.split}.json")
        self.asins = read(prepared(path, triplets))
        if not self.asins:
            raise ValueError(f"{path}: empty gallery")

    def __len__(self):
        return len(self.asins)

    def __getitem__(self, i):
        img = load_image(self.image_path(self.asins[i]), f"gallery item {i} ({self.asins[i]})")
        return {"image": transform(img, self.size), "index": torch.tensor(i)}  # (3, S, S)


# the layouts a prepared root may hold: a forker adds one here
LAYOUTS = {"products": ProductDataset, "triplets": TripletDataset}


def open_dataset(layout, root, split, tokenizer, image_size, train, cfg):
    """The dataset of ROOT/<layout>, with errors that say what is missing and how to make it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown data layout {layout!r}; known: {sorted(LAYOUTS)}")
    path = prepared(os.path.join(root, layout), LAYOUTS[layout])
    return LAYOUTS[layout](path, split, tokenizer, image_size, train, cfg)


def open_datasets(layouts, roots, split, tokenizer, image_size, train, cfg, keys=None):
    """{task: its dataset} from {task: layout} and {task: root}; tasks reading the same layout from the same
    root share one dataset. keys: {task: the batch keys it reads}; a task whose data does not hold one of
    them (e.g. texts of an image-only root, a label it classifies) is an error naming it and the root."""
    opened = {}
    for where in dict.fromkeys((layout, roots[t]) for t, layout in layouts.items()):  # in task order
        opened[where] = open_dataset(*where, split, tokenizer, image_size, train, cfg)
    datasets = {t: opened[layout, roots[t]] for t, layout in layouts.items()}
    for t, needed in (keys or {}).items():
        missing = sorted(set(needed) - datasets[t].keys)
        if missing:
            why = "; it is image-only" if "text" in missing else ""
            raise ValueError(f"task {t} reads {missing}, which {datasets[t].dir} does not hold (its items: "
                             f"{sorted(datasets[t].keys)}{why})")
    return datasets


def data_roots(spec, names):
    """A run's data spec "ROOT[,task=ROOT,...]" -> {task: root} for the task names: the default root,
    then per-task overrides."""
    default, *overrides = [s.strip() for s in spec.split(",")]
    if not default or default.partition("=")[0] in names:
        raise ValueError(f"data spec {spec!r}: the default ROOT comes first, then task=ROOT overrides")
    roots = dict.fromkeys(names, default)
    for o in overrides:
        task, eq, root = o.partition("=")
        if not eq or task.strip() not in roots:
            raise ValueError(f"data spec {spec!r}: {o!r} is not task=ROOT for one of the tasks {list(names)}")
        roots[task.strip()] = root.strip()
    return roots
