"""ToyFashion: a small synthetic fashion catalogue drawn with PIL, in the layouts data.py reads.

Six categories of three sub-categories that differ by one drawn length (sleeves, hem, leg, strap, shaft), 13
colours, four patterns, five details. Every task needs what it tests: ~30 % of the texts omit the
sub-category (SCR needs the image), ~20 % of the images are drawn halfway to a neighbour (SCR needs the
text), and a TGIR caption alone fits >= 3 gallery items (the reference image singles out the target).
Usage: python toy.py --out ROOT [--seed 0] [--products 4500] [--size 64] [--image_size 64]
(2,500 train, 2,000 val products by default; the arrays are prepared for a model of --image_size)
"""
import argparse, collections, itertools, json, math, os, random
from PIL import Image, ImageDraw, ImageFilter

import cli
import prepare
from prepare import atomic_dir, product_text, write

# the attributes of a product's labels, in labels.json order: the columns of a dataset item's "attrs"
ATTRIBUTES = ("category", "subcategory", "colour", "pattern", "detail")
# The small CLIPs of this project, open_clip config dicts with the real tokenizer's 49,408-token vocabulary.
# CLIP: the demo's, trained from scratch on ToyFashion: ~15 M parameters, half of them the vocabulary, 64 px
# images, 32 text tokens (the toy's texts are short). TINY_CLIP: the tests' and every --quick run's, built in
# milliseconds.
CLIP = dict(embed_dim=128, quick_gelu=True,
            vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=4))
TINY_CLIP = dict(embed_dim=32, quick_gelu=True,
                 vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2))

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
           "orange": (240, 130, 30), "purple": (120, 60, 165), "beige": (215, 190, 150),
           "teal": (20, 130, 130), "maroon": (120, 20, 45)}
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


def cloth(rgb, pattern, size):
    """(accent, fabric): a size x size square in the colour, with the pattern in an accent that contrasts."""
    accent = (245, 245, 245) if sum(rgb) < 400 else (35, 35, 35)
    fabric = Image.new("RGB", (size, size), rgb)
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
    return accent, fabric


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
    accent, fabric = cloth(COLOURS[colour], pattern, size)
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
    def attr(r, a):
        return r["labels"][a]
    def level(r):  # 0, 1, 2: the place of r's sub-category in its category's order of length
        return [s[0] for s in TOY_CATEGORIES[attr(r, "category")][2]].index(attr(r, "subcategory"))

    # (category, change, values after the change) -> how many products fit the caption alone
    fit = collections.Counter((attr(r, "category"), c, tuple(attr(r, a) for a in c))
                              for r in rows for c in CHANGES)
    groups = collections.defaultdict(list)  # (category, detail) -> products: a pair comes from one group
    for r in rows:
        if not r["meta"]["ambiguous_image"]:  # a blurred length would make "longer" unfair
            groups[(attr(r, "category"), attr(r, "detail"))].append(r)
    found = {ch: [] for ch in CHANGES}  # kind of change -> [(fit, ref, target, change)]
    for g in groups.values():
        for ref, tgt in itertools.permutations(g, 2):
            ch = tuple(a for a in ("colour", "pattern", "subcategory") if attr(ref, a) != attr(tgt, a))
            m = fit[(attr(ref, "category"), ch, tuple(attr(tgt, a) for a in ch))]
            if ch in found and abs(level(ref) - level(tgt)) <= 1 and m >= min_fit:
                found[ch].append((m, ref, tgt, {a: attr(tgt, a) for a in ch}))
    out, kinds = [], [ch for ch in CHANGES if found[ch]]
    while len(out) < n and kinds:
        ch = rng.choice(kinds)  # a kind of change first, then a pair: the kinds stay balanced
        m, ref, tgt, change = found[ch].pop(rng.randrange(len(found[ch])))
        kinds = [k for k in kinds if found[k]]
        noun = TOY_CATEGORIES[attr(ref, "category")][1]
        more = "longer" if level(tgt) > level(ref) else "shorter"
        # attribute -> its change in the two annotators' styles
        phrase = {"colour": ("is " + attr(tgt, "colour"), "in " + attr(tgt, "colour")),
                  "pattern": PATTERNS[attr(tgt, "pattern")][2],
                  "subcategory": (f"has {more} {noun}" if noun else f"is {more}", f"{more} {noun}".strip())}
        # name only what changes: "is red and has dots"
        caps = [" and ".join(phrase[a][style] for a in change) for style in (0, 1)]
        triplet = {"candidate": ref["id"], "target": tgt["id"], "captions": caps, "change": change}
        out.append((attr(ref, "category"), triplet, m))
    return out


def make_toy(out, seed=0, products=4500, size=64, image_size=None):
    """Write ROOT/products and ROOT/triplets for ToyFashion, drawn at size px, their arrays prepared for a
    model of image_size px (default: size). Same arguments -> byte-identical files."""
    rng = random.Random(seed)
    combos = list(itertools.product(TOY_CATEGORIES, range(3), COLOURS, PATTERNS, DETAILS))
    rng.shuffle(combos)  # 4,680 distinct attribute tuples, so each product's ground truth is well defined
    recs, omitted = {"train": [], "val": []}, {}
    with atomic_dir(os.path.join(out, "products")) as gen, atomic_dir(os.path.join(out, "triplets")) as iq:
        os.makedirs(os.path.join(gen, "images"))
        os.makedirs(os.path.join(iq, "images"))
        for i in range(products):
            cat, k, col, pat, det = combos[i % len(combos)]
            # 2,500 / 2,000: val galleries of ~330 images per category and ~110 products per sub-category,
            # so TGIR's R@10 / R@50 and random-100's negatives (same sub-category) mean something
            split = "val" if i % 9 >= 5 else "train"
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
            views[0].save(os.path.join(iq, "images", pid + ".png"), format="PNG")  # triplets: one view
            labels = dict(zip(ATTRIBUTES, (cat, subs[k][0], col, pat, det)))
            recs[split].append({"id": pid, "text": product_text(name, desc), "name": name,
                                "description": desc, "images": images, "labels": labels,
                                "meta": {"text_has_subcategory": not omit, "ambiguous_image": ambiguous}})
        # every value the generator can draw, whether or not this many products drew it in train
        values = (TOY_CATEGORIES, [s[0] for c in TOY_CATEGORIES.values() for s in c[2]], COLOURS, PATTERNS,
                  DETAILS)
        write(os.path.join(gen, "labels.json"), {a: sorted(v) for a, v in zip(ATTRIBUTES, values)})
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
                gallery = [r["id"] for r in rows if r["labels"]["category"] == c]
                write(os.path.join(iq, f"triplets.{c.lower()}.{split}.jsonl"), triplets)
                write(os.path.join(iq, f"gallery.{c.lower()}.{split}.json"), gallery)
        write(os.path.join(gen, "meta.json"), {"source": "toy", "class": "subcategory", "text": True})
        write(os.path.join(iq, "meta.json"), {"source": "toy"})
        prepare.product_arrays(gen, image_size or size)  # the images squared once, the texts tokenised once
        prepare.triplet_arrays(iq, image_size or size, ", ")
        for d in (gen, iq):
            write(os.path.join(d, "report.json"), report)
    return report


# ---------------------------------------------------------------- the pretraining corpus
# Everyday objects in unit coordinates, and the corpus's colours: ToyFashion's and five it never uses
def arc(n, r, start=0., span=2 * math.pi, r2=None):  # n corners on a circle of radius r (every other: r2)
    radii = [r if r2 is None or k % 2 == 0 else r2 for k in range(n)]
    angles = [start + span * k / n for k in range(n)]
    return tuple(v for q, a in zip(radii, angles) for v in (.5 + q * math.sin(a), .5 - q * math.cos(a)))


OBJECTS = {"ball": [arc(16, .4)], "box": [(.15, .15, .85, .15, .85, .85, .15, .85)],
           "triangle": [(.5, .1, .9, .85, .1, .85)], "star": [arc(10, .45, r2=.18)],
           "flag": [(.25, .15, .8, .15, .8, .5, .25, .5), (.2, .15, .25, .15, .25, .9, .2, .9)],
           "cup": [(.2, .25, .7, .25, .62, .85, .28, .85), (.7, .35, .85, .4, .85, .6, .68, .65)],
           "house": [(.2, .45, .8, .45, .8, .9, .2, .9), (.1, .48, .5, .1, .9, .48)],
           "tree": [(.5, .05, .85, .7, .15, .7), (.43, .7, .57, .7, .57, .95, .43, .95)],
           "umbrella": [arc(9, .42, -math.pi / 2, math.pi * 9 / 8), (.48, .5, .52, .5, .52, .9, .48, .9)]}
CORPUS_COLOURS = {**COLOURS, "white": (248, 248, 248), "gold": (212, 175, 55), "sky blue": (110, 180, 235),
                  "olive": (110, 115, 40), "lavender": (185, 160, 220)}
GROUNDS = [(250, 250, 250), (210, 210, 210), (245, 235, 210), (205, 225, 245), (215, 240, 215), (70, 70, 70)]


def corpus_item(rng):
    """One thing of a scene: (name, plural name, colour, pattern, polygons in unit coordinates): a garment of
    ToyFashion's 18 kinds (its exact drawn length, no detail) or an everyday object."""
    colour, pattern = rng.choice(list(CORPUS_COLOURS)), rng.choice(list(PATTERNS))
    if rng.random() < .6:
        cat = rng.choice(list(TOY_CATEGORIES))
        sub, word, p = rng.choice(TOY_CATEGORIES[cat][2])
        return word, sub.lower(), colour, pattern, TOY_CATEGORIES[cat][4](p)
    name = rng.choice(list(OBJECTS))
    return name, name + "s", colour, pattern, OBJECTS[name]


def corpus_caption(items, rng):
    """Alt-text, not ToyFashion's grammar: short, a shop's plural names, some of it wrong or empty."""
    def one(name, plural, colour, pattern):
        if rng.random() < .12:  # a wrong colour, as web captions have
            colour = rng.choice([c for c in CORPUS_COLOURS if c != colour])
        adj = rng.choice({"solid": ["", "plain"], "striped": ["striped"], "dotted": ["dotted", "polka dot"],
                          "checked": ["checked", "plaid"]}[pattern])
        return rng.choice([f"{colour} {name}", f"{colour} {adj} {name}", f"{name}, {colour}",
                           f"{adj} {name} in {colour}", f"a {colour} {name}", f"photo of a {colour} {name}",
                           f"{plural} - {colour}", f"new {colour} {plural}", f"{colour} {plural} for sale"]
                          ).replace("  ", " ").strip()
    if rng.random() < .05:  # no information at all
        camera = f"IMG_{rng.randrange(9999):04}.jpg"
        return rng.choice(["image", "photo", "untitled", "product photo", camera])
    parts = [one(*item[:4]) for item in items]
    return parts[0] if len(parts) == 1 else rng.choice([" and ", " with ", ", "]).join(parts)


def draw_scene(items, size, rng):
    """One or two things on a ground of another colour than ToyFashion's, at their own scales and places."""
    img = Image.new("RGB", (size, size), rng.choice(GROUNDS))
    boxes = [(0, 0, 1)] if len(items) == 1 else [(0, .25, .5), (.5, .25, .5)]  # (x, y, side) in units
    for (x, y, side), (_, _, colour, pattern, polys) in zip(boxes, items):
        s = side * rng.uniform(.7, .95)  # the thing's side, placed anywhere in its box
        ox, oy = x + rng.uniform(0, side - s), y + rng.uniform(0, side - s)
        mask = Image.new("L", (size, size), 0)
        for poly in polys:
            ImageDraw.Draw(mask).polygon([(size * (ox + u * s), size * (oy + v * s))
                                          for u, v in zip(poly[::2], poly[1::2])], fill=255)
        img.paste(cloth(CORPUS_COLOURS[colour], pattern, size)[1], mask=mask)
        img.paste((60, 60, 60), mask=mask.filter(ImageFilter.FIND_EDGES))
    return img


def make_corpus(out, seed=0, images=30000, size=64, image_size=None):
    """A generic image-text corpus for pretraining the toy's CLIP, in the products layout (class: the first
    thing's kind): scenes of one or two garments or everyday objects on varied grounds, captioned as the web
    captions images. It shares ToyFashion's primitives (colours, patterns, shapes, lengths) but none of its
    products (no detail, other grounds, scales and companions) and none of its texts."""
    rng, recs = random.Random(seed), {"train": [], "val": []}
    with atomic_dir(os.path.join(out, "products")) as gen:
        os.makedirs(os.path.join(gen, "images"))
        for i in cli.progress(range(images), images, "corpus images"):
            items = [corpus_item(rng) for _ in range(1 if rng.random() < .65 else 2)]
            path = f"images/{i:06d}.png"
            draw_scene(items, size, rng).save(os.path.join(gen, path), format="PNG")
            recs["val" if i % 20 == 19 else "train"].append(
                {"id": f"c{i:06d}", "text": corpus_caption(items, rng), "images": [path],
                 "labels": {"object": items[0][0], "colour": items[0][2]}})
        labels = {"object": sorted({r["labels"]["object"] for r in recs["train"]}),
                  "colour": sorted({r["labels"]["colour"] for r in recs["train"]})}
        report = {"seed": seed, "images": images, **{s: len(r) for s, r in recs.items()}}
        for name, obj in (("labels.json", labels), ("products.train.jsonl", recs["train"]),
                          ("products.val.jsonl", recs["val"]), ("report.json", report),
                          ("meta.json", {"source": "corpus", "class": "object", "text": True})):
            write(os.path.join(gen, name), obj)
        prepare.product_arrays(gen, image_size or size)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the prepared ROOT to write")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files")
    p.add_argument("--products", type=int, default=4500, help="products in all, train and val")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, as drawn")
    p.add_argument("--image_size", type=int, help="the model input the arrays are for (default: --size)")
    args = p.parse_args(argv)
    report = make_toy(args.out, args.seed, args.products, args.size, args.image_size)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli.command_line(main)
