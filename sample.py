r"""
Use a trained checkpoint on your own image: every task of the checkpoint predicts through its row's
`predict` (tasks.py), e.g. for the paper's four tasks:

    python sample.py out-demo/ckpt.pt shirt.png --task fic [--beam 3]           # caption it
    python sample.py out-demo/ckpt.pt shirt.png --task scr --text "Long sleeve shirt in navy."
    python sample.py out-demo/ckpt.pt shirt.png --task xmr --text "a photo of a shirt|a photo of a dress"
    python sample.py out-demo/ckpt.pt shirt.png --task xmr --gallery photos/ [--text "red dotted dress"]
    python sample.py out-demo/ckpt.pt shirt.png --task tgir --text "is red" --gallery photos/

--text takes one text, or several separated by '|' (which xmr ranks for the image: zero-shot
classification with prompts); --gallery a folder of images to rank.
"""
import argparse
import glob
import os

import torch

import cli
import data
from evaluate import load_model
from tasks import TASKS

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".webp")


def example(args, cfg, model):
    """What a row's predict reads (tasks.py): the image, the texts, the gallery, the class names. An image
    file becomes what evaluation sees of a prepared one: Table 5's square, centre-cropped, normalised."""
    def load(path):  # (3, S, S) float
        square = data.square(data.load_image(path, "--image"), model.image_size)
        return data.normalize(data.crop(square, model.image_size))

    texts = [t.strip() for t in args.text.split("|") if t.strip()]
    tokens = data.tokenize(texts, model.context_length).to(args.device) if texts else None  # (N, L)
    gallery = None
    if args.gallery:
        found = glob.glob(os.path.join(args.gallery, "**", "*"), recursive=True)
        paths = sorted(f for f in found if f.lower().endswith(IMAGE_TYPES))
        if not paths:
            raise FileNotFoundError(f"--gallery {args.gallery}: no {'/'.join(IMAGE_TYPES)} images there")
        gallery = paths, torch.stack([load(f) for f in paths]).to(args.device)  # (G, 3, S, S)
    return dict(image=load(args.image)[None].to(args.device), text=tokens, texts=texts, gallery=gallery,
                labels=cfg["labels"].get(args.task, {}), beam=args.beam)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint of train.py")
    p.add_argument("image", help="the image to predict for")
    p.add_argument("--task", default="", help="which of the checkpoint's tasks predicts (if it has several)")
    p.add_argument("--text", default="", help="a text, or several separated by '|'")
    p.add_argument("--gallery", default="", help="a folder of images to rank")
    p.add_argument("--beam", type=int, default=1, help="captioning beam size (1 = greedy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    args = p.parse_args(argv)
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"{args.image}: no such image")
    model, cfg = load_model(args.ckpt, args.device)
    if not args.task and len(model.tasks) == 1:
        args.task = next(iter(model.tasks))
    if args.task not in model.tasks:
        raise ValueError(f"--task {args.task or '?'}: choose one of the checkpoint's tasks "
                         f"{list(model.tasks)}")
    row = TASKS.get(args.task)
    if row is None or row.predict is None:
        raise ValueError(f"task {args.task!r} has no `predict` in its row in tasks.TASKS")
    with torch.no_grad():
        lines = row.predict(model, args.task, example(args, cfg, model))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    cli.command_line(main)
