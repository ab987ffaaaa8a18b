"""
Pictures of an evaluation, with PIL only: the protocols (protocols.py) name what to show, as rows of

    (text lines, [(prepared image, None | outline colour | heat map (g, g) in any range)])

(a prepared image: a dataset's (3, side, side) uint8 square) and this file draws each set of rows as one
PNG: the text above its row of images, each image as the model sees it (the evaluation's centre crop), an
outline around some, a heat map blended over others (attention over the image patches, scaled to [0, 1] per
map).
"""
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data


def thumb(square, size, side=128):
    """What the model sees of a prepared image (the evaluation's centre crop to `size`), enlarged."""
    return Image.fromarray(data.crop(square, size).permute(1, 2, 0).numpy()).resize((side, side))


def heat(a, side=128):  # (g, g) -> a side x side colour map, blue (low) to red (high), scaled per map
    a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    grey = Image.fromarray(np.uint8(255 * a)).resize((side, side), Image.BILINEAR)
    return ImageOps.colorize(grey, "blue", "red", mid="yellow")


def save_grid(rows, path, size, side=128, cols=6):
    """rows of (text lines, [(image path, mark)]) -> one PNG at path; returns path."""
    width = cols * (side + 8) // 6  # characters per text line: the default font is ~6 px wide
    rows = [([w for line in lines for w in textwrap.wrap(line, width)], items) for lines, items in rows]
    height = sum(14 * len(t) + side + 14 for t, _ in rows) + 8
    canvas = Image.new("RGB", (cols * (side + 8) + 8, height), "white")
    d, y, font = ImageDraw.Draw(canvas), 8, ImageFont.load_default()
    for lines, items in rows:
        for line in lines:
            d.text((8, y), line, fill="black", font=font)
            y += 14
        for x, (square, mark) in zip(range(8, canvas.width, side + 8), items):
            im = thumb(square, size, side)
            if isinstance(mark, np.ndarray):
                im = Image.blend(im, heat(mark, side), 0.5)
            canvas.paste(im, (x, y + 3))
            if isinstance(mark, str):
                d.rectangle([x - 3, y, x + side + 2, y + side + 5], outline=mark, width=3)
        y += side + 14
    canvas.save(path)
    return path


def save_all(pictures, out_dir, size):
    """{name: rows} -> one PNG per name in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [save_grid(rows, os.path.join(out_dir, f"{name}.png"), size)
            for name, rows in pictures.items() if rows]
