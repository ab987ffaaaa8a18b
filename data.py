"""Data for FAME-ViL: the prepared layouts on disk and the datasets that read them.

A prepared root holds one directory per layout, named by it; the loaders read only these, and of the images
only the arrays: each image resized once, when prepared, to Table 5's square (S * 256/224: 256 x 256 for a
224 px model) and stored raw, each text tokenised once at CLIP's 77 tokens. Training memory-maps them, crops
and flips uint8, and normalises on the device.
ROOT/products/   XMR, SCR, FIC, CMA-CLIP (FashionGen, a shop's own catalogue, ToyFashion)
    meta.json                   {"source", "class": the class attribute (what SCR recognises, zero-shot names
                                 and random-100 groups by), "text": whether products have texts}
    labels.json                 {attribute: [sorted values seen in TRAIN]}, attributes in a fixed order
    products.{train,val}.jsonl  {"id", "text" (unless image-only), "images": [its views: files under
                                 ROOT/products, or FashionGen's h5 rows], "labels": {attribute: value}, ...}
    images.<split>.<side>.u8    (views, 3, side, side) uint8: every product's views in record order
    tokens.<split>.i32          (products, 77) int32: each product's text
    images/...  report.json     (the image files, if any; what the converter skipped or cleaned, counted)
ROOT/triplets/   TGIR (FashionIQ, ToyFashion)
    meta.json                     {"source", "caption_join": how a triplet's captions became its text}
    triplets.<cat>.<split>.jsonl  {"candidate": ASIN, "target": ASIN, "captions": [str, ...]}
    gallery.<cat>.<split>.json    [ASIN, ...]: the official image_splits list minus unusable images
    images.<split>.json, .<side>.u8, tokens.<cat>.<split>.i32: the split's images (their ASINs in row order),
                                  the triplets' joined captions
    images/<ASIN>.<ext>  report.json
The converters that write these layouts live in prepare.py (python prepare.py --help), ToyFashion in toy.py.
"""
import glob, hashlib, itertools, json, math, os, random
import numpy as np
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


def need(path, fix):
    """A missing input is a FileNotFoundError naming it and what would supply it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {fix}")
    return path


def prepared(path, layout):
    """A path of a prepared layout, or a FileNotFoundError naming it and the command that makes it."""
    return need(path, f"make it with {layout.made_by}")


def read_meta(dir, image_size):
    """A layout's meta.json. A root prepared before it existed, or whose arrays have another format than
    ARRAYS (a file of the same size would read as wrong pixels), gets the command that upgrades it."""
    fix = f"python prepare.py upgrade {os.path.dirname(os.path.abspath(dir))} --image_size {image_size}"
    meta = read(need(os.path.join(dir, "meta.json"), f"{dir} was prepared by an older version: {fix}"))
    if meta.get("arrays") != ARRAYS:
        raise ValueError(f"{dir} holds arrays of another format ({meta.get('arrays')!r}, not {ARRAYS!r}): "
                         f"{fix}")
    return meta


def load_image(path, who):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image of {who} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode here, inside the try
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image of {who} ({e})") from e


# ---------------------------------------------------------------- images and texts as arrays, prepared once
CONTEXT = 77  # texts are tokenised once at CLIP's length; a model with a shorter context cuts them at load
ARRAYS = "images uint8 (N, 3, side, side), tokens int32 (N, 77)"  # their format, recorded in meta.json


def side(image_size):  # Table 5's Resize(256, 256) for a 224 model: the square both crops start from
    return round(image_size * 256 / 224)


def square(img, image_size):
    """A PIL image -> (3, side, side) uint8, channels first as the model reads them: the resize (bicubic, as
    CLIP's preprocessing) that preparing a root does once per image, so that loading only crops."""
    s = side(image_size)
    return np.asarray(img.convert("RGB").resize((s, s), Image.BICUBIC)).transpose(2, 0, 1)


def tokenize(texts, context_length=CONTEXT):
    """list[str] -> (N, context_length) int64 ids by open_clip's CLIP tokenizer (its BPE, SOT ... EOT, zero
    padding); a long text is cut with EOT kept last. The prepared arrays hold them at CONTEXT."""
    import open_clip  # imported here: its import is slow and the loaders need it for nothing else
    return open_clip.tokenize(texts, context_length=context_length)


def cut(tokens, context_length):
    """(N, CONTEXT) prepared ids -> (N, context_length) int64, exactly what tokenize(texts, context_length)
    gives: the first ids, EOT (the largest id) last where the text was longer."""
    if context_length > tokens.shape[1]:
        raise ValueError(f"a context of {context_length} tokens exceeds the prepared {tokens.shape[1]}")
    t = torch.from_numpy(np.asarray(tokens[:, :context_length], dtype=np.int64))  # (N, L)
    eot = int(tokens.max())  # every row ends its text with EOT, the largest id of the vocabulary
    t[t.max(1).values != eot, -1] = eot
    return t


def crop(image, size, rng=None, aug="crop"):
    """A prepared (3, side, side) uint8 image -> (3, size, size) uint8. Evaluation (no rng): the centre crop.
    Training draws from the item's random.Random in a fixed order, so the crop is a pure function of the
    item's seed and resume is exact: crop = RandomCrop -> flip (the paper's supplement); rrc =
    RandomResizedCrop(.8-1, .75-1.3) of the square -> flip (the authors' code; one draw, clipped)."""
    H, W = image.shape[1:]
    if rng is None:  # torchvision's centre crop
        top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
        patch = image[:, top:top + size, left:left + size]
    elif aug == "crop":
        top, left = rng.randint(0, H - size), rng.randint(0, W - size)
        patch = image[:, top:top + size, left:left + size]
    elif aug == "rrc":
        area = W * H * rng.uniform(.8, 1.)
        ratio = math.exp(rng.uniform(math.log(.75), math.log(1.3)))
        w, h = min(W, round(math.sqrt(area * ratio))), min(H, round(math.sqrt(area / ratio)))
        top, left = rng.randint(0, H - h), rng.randint(0, W - w)
        patch = torch.from_numpy(np.ascontiguousarray(image[:, top:top + h, left:left + w]))
        patch = TF.resize(patch, [size, size], TF.InterpolationMode.BICUBIC, antialias=True).numpy()
    else:
        raise ValueError(f"aug must be 'crop' or 'rrc', got {aug!r}")
    if rng is not None and rng.random() < .5:
        patch = patch[:, :, ::-1]  # horizontal flip
    return torch.from_numpy(np.ascontiguousarray(patch))


def normalize(images):
    """uint8 images (..., 3, S, S) -> float, CLIP-normalised, where they are (on the device, after a 4x
    smaller copy): x / 255, then (x - mean) / std, the arithmetic of torchvision's to_tensor and normalize."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1)
                 for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    return images.float().div(255).sub_(mean).div_(std)


def to_device(batch, device):
    """A collated batch onto the device; its uint8 tensors are images, normalised there."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: normalize(v) if v.dtype == torch.uint8 else v for k, v in batch.items()}


def images_file(dir, split, image_size):  # a split's images, at the square of a model's size
    return os.path.join(dir, f"images.{split}.{side(image_size)}.u8")


def tokens_file(dir, name):  # the texts of products.<name>.jsonl or triplets.<name>.jsonl, tokenised once
    return os.path.join(dir, f"tokens.{name}.i32")


def image_arrays(dir, split, image_size, n, made_by):
    """The memory-mapped (n, 3, side, side) uint8 images of one split of a layout, prepared for a model of
    image_size; missing or of another count: an error naming the command that writes them."""
    path = images_file(dir, split, image_size)
    root = os.path.dirname(os.path.abspath(dir))
    fix = (f"the {split} images of {dir} at {side(image_size)} px, for a {image_size} px model: write them "
           f"with python prepare.py upgrade {root} --image_size {image_size} (or prepare anew: {made_by})")
    need(path, fix)
    count = os.path.getsize(path) // (3 * side(image_size) ** 2)
    if count != n:
        raise ValueError(f"{path} holds {count} images where its records list {n}: {fix}")
    # a plain ndarray over the map: numpy's memmap class would wrap every slice of every item
    return np.memmap(path, np.uint8, "r", shape=(n, 3, side(image_size), side(image_size))).view(np.ndarray)


def token_arrays(path, n, made_by):  # the (n, CONTEXT) int32 memory-mapped texts of a prepared file
    need(path, f"make it with {made_by}")
    if os.path.getsize(path) != n * CONTEXT * 4:
        count = os.path.getsize(path) // (CONTEXT * 4)
        raise ValueError(f"{path} holds {count} texts where its records list {n}: prepare anew ({made_by})")
    return np.memmap(path, np.int32, "r", shape=(n, CONTEXT)) if n else np.zeros((0, CONTEXT), np.int32)


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
            perm = torch.randperm(n, generator=g).numpy()  # host data, drawn on the host
        first = (j * world + rank) * batch  # global batch j is ranks 0..world-1's slices, in order
        yield [(int(i), seed_of(seed, "item", salt, epoch, int(i))) for i in perm[first:first + batch]]


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

    def __init__(self, dir, split, context_length, image_size, train, cfg):
        self.dir, self.size, self.train, self.aug = dir, image_size, train, cfg["aug"]
        path, lpath = os.path.join(dir, f"products.{split}.jsonl"), os.path.join(dir, "labels.json")
        self.products, self.labels = read(prepared(path, self)), read(prepared(lpath, self))
        meta = read_meta(dir, image_size)
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
        # (I,) each image's product; its views are rows first[p] .. first[p] + views[p] - 1 of the images
        views = np.array([len(r["images"]) for r in self.products])
        self.image_product = torch.from_numpy(np.repeat(np.arange(len(views)), views))
        self.views, self.first = views, views.cumsum() - views
        self.images = image_arrays(dir, split, image_size, int(views.sum()), self.made_by)
        if self.has_text:  # (P, L) int64 ids of each product's text, cut to the model's context
            tokens = token_arrays(tokens_file(dir, split), len(views), self.made_by)
            self.tokens = cut(tokens, context_length)
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

    def image(self, i):  # the prepared square of image i (eval item i): (3, side, side) uint8
        return self.images[i]

    def __getitem__(self, key):
        index, rng = split_key(key)
        if self.train:  # product `index`, one of its views
            p = index
            row = self.first[p] + rng.randrange(self.views[p])
        else:  # image `index`
            p, row = int(self.image_product[index]), index
        attrs = self.attrs[p].clone()  # (A,) a copy: a worker would otherwise send all of self.attrs
        image = crop(self.images[row], self.size, rng if self.train else None, self.aug)  # (3, S, S)
        item = {"image": image, "product": torch.tensor(p), "attrs": attrs,
                "class": attrs[self.column("class")],
                **dict(zip(self.attributes, attrs))}
        if self.has_text:
            item["text"] = self.tokens[p]  # (L,)
        return item


class TripletDataset(Dataset):
    """ROOT/triplets of one split for TGIR: reference image + joined captions -> target image."""
    made_by = "python prepare.py fashioniq --root DIR --out ROOT, or python toy.py --out ROOT"
    labels, classes = {}, {}  # no label attributes: nothing to classify
    keys = {"ref", "text", "target", "category", "target_index"}

    def __init__(self, dir, split, context_length, image_size, train, cfg, categories=None):
        self.dir, self.split, self.size, self.train, self.aug = dir, split, image_size, train, cfg["aug"]
        meta = read_meta(dir, image_size)
        self.source, self.join = meta["source"], meta["caption_join"]  # how the captions were joined
        pattern = os.path.join(dir, f"triplets.*.{split}.jsonl")
        self.categories = list(categories or sorted(os.path.basename(p).split(".")[1]
                                                    for p in glob.glob(pattern)))
        paths, self.triplets = [os.path.join(dir, f"triplets.{c}.{split}.jsonl") for c in self.categories], []
        tokens = []
        for c, (cat, path) in enumerate(zip(self.categories, paths)):
            gpath = os.path.join(dir, f"gallery.{cat}.{split}.json")
            where = {a: i for i, a in enumerate(read(prepared(gpath, self)))}
            rows = read(prepared(path, self))
            for n, t in enumerate(rows, 1):
                t = t if isinstance(t, dict) else {}
                if t.get("target") not in where or not t.get("captions"):
                    raise ValueError(f"{path}:{n}: no captions, or target {t.get('target')} not in {gpath}")
                self.triplets.append((c, t, where[t["target"]]))  # (category, record, target's gallery index)
            tokens.append(token_arrays(tokens_file(dir, f"{cat}.{split}"), len(rows), self.made_by))
        if not self.triplets:
            raise ValueError(f"no triplets for split '{split}' in {paths or pattern}")
        self.tokens = cut(np.concatenate(tokens), context_length)  # (T, L): each triplet's joined captions
        asins = read(prepared(os.path.join(dir, f"images.{split}.json"), self))  # the image arrays' rows
        self.rows = {a: i for i, a in enumerate(asins)}
        self.images = image_arrays(dir, split, image_size, len(self.rows), self.made_by)

    def __len__(self):
        return len(self.triplets)

    def image(self, asin):  # the prepared square of an image: (3, side, side) uint8
        if asin not in self.rows:
            raise ValueError(f"{self.dir}: no prepared image of {asin} in split {self.split}")
        return self.images[self.rows[asin]]

    def gallery(self, cat):
        return GalleryDataset(self, cat)

    def __getitem__(self, key):
        index, rng = split_key(key)
        c, t, target_index = self.triplets[index]
        rng = rng if self.train else None  # the reference draws its crop and flip first, then the target
        ref = crop(self.image(t["candidate"]), self.size, rng, self.aug)  # (3, S, S)
        return {"ref": ref, "text": self.tokens[index],  # (L,)
                "target": crop(self.image(t["target"]), self.size, rng, self.aug),
                "category": torch.tensor(c), "target_index": torch.tensor(target_index)}


class GalleryDataset(Dataset):
    """The images of gallery.<cat>.<split>.json in order, centre-cropped: what TGIR ranks."""

    def __init__(self, triplets, cat):
        self.image, self.size = triplets.image, triplets.size
        path = os.path.join(triplets.dir, f"gallery.{cat}.{triplets.split}.json")
        self.asins = read(prepared(path, triplets))
        if not self.asins:
            raise ValueError(f"{path}: empty gallery")

    def __len__(self):
        return len(self.asins)

    def __getitem__(self, i):
        return {"image": crop(self.image(self.asins[i]), self.size), "index": torch.tensor(i)}  # (3, S, S)


# the layouts a prepared root may hold: a forker adds one here
LAYOUTS = {"products": ProductDataset, "triplets": TripletDataset}


def open_dataset(layout, root, split, context_length, image_size, train, cfg):
    """The dataset of ROOT/<layout> for a model's text context and image size, with errors that say what is
    missing and how to make it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown data layout {layout!r}; known: {sorted(LAYOUTS)}")
    path = prepared(os.path.join(root, layout), LAYOUTS[layout])
    return LAYOUTS[layout](path, split, context_length, image_size, train, cfg)


def open_datasets(layouts, roots, split, context_length, image_size, train, cfg, keys=None):
    """{task: its dataset} from {task: layout} and {task: root}; tasks reading the same layout from the same
    root share one dataset. keys: {task: the batch keys it reads}; a task whose data does not hold one of
    them (e.g. texts of an image-only root, a label it classifies) is an error naming it and the root."""
    opened = {}
    for where in dict.fromkeys((layout, roots[t]) for t, layout in layouts.items()):  # in task order
        opened[where] = open_dataset(*where, split, context_length, image_size, train, cfg)
    datasets = {t: opened[layout, roots[t]] for t, layout in layouts.items()}
    for t, needed in (keys or {}).items():
        missing = sorted(set(needed) - datasets[t].keys)
        if missing:
            why = "; it is image-only" if "text" in missing else ""
            raise ValueError(f"task {t} reads {missing}, which {datasets[t].dir} does not hold (its items: "
                             f"{sorted(datasets[t].keys)}{why})")
    return datasets
