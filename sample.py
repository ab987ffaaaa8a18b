r"""
Use a trained FAME-ViL checkpoint on your own image: caption it, classify it, or search a folder with it.

    python sample.py out-demo/ckpt.pt shirt.png --caption [--beam 3]
    python sample.py out-demo/ckpt.pt shirt.png --classify \
        --text "Long sleeve shirt in navy. Striped pattern."
    python sample.py out-demo/ckpt.pt shirt.png --labels "shirt,dress,tote bag"  # zero-shot: no trained head
    python sample.py out-demo/ckpt.pt shirt.png --retrieve photos/ [--text "red dotted dress"]

--caption runs FIC (generative mode); --classify the SCR head on the fused image + --text; --labels
compares the image with "a photo of <label>" in contrastive mode; --retrieve ranks FOLDER's images by
cosine with the image, or with --text if given. With no action, --caption.
"""
import argparse
import glob
import os
import sys

import torch
import torch.nn.functional as F

import data
from evaluate import contrastive_task, decode, load_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("image")
    p.add_argument("--caption", action="store_true", help="describe the image (FIC)")
    p.add_argument("--classify", action="store_true",
                   help="sub-category from the image + --text (SCR head)")
    p.add_argument("--labels", default="", help="comma list of names for zero-shot classification")
    p.add_argument("--retrieve", default="",
                   help="folder of images: print the top 5 for the image (or --text)")
    p.add_argument("--text", default="",
                   help="the product description (--classify) or the query (--retrieve)")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    m, cfg, tok, size = load_checkpoint(args.ckpt, args.device)

    def load(path):  # the evaluation transform: (3, S, S)
        return data.transform(data.load_image(path, path), size)

    def unit(f):  # cosine similarity = dot product of unit vectors
        return F.normalize(f, dim=-1)

    x = load(args.image)[None].to(args.device)  # (1, 3, S, S)
    task = contrastive_task(m)  # retrieval and zero-shot: XMR's TSA if the model has XMR
    with torch.no_grad():
        if args.caption or not (args.classify or args.labels or args.retrieve):
            print("caption:", decode(m.generate(x, cfg["context_length"] - 1, args.beam)[0]))

        if args.classify:
            if not args.text:
                sys.exit("--classify needs --text: SCR classifies the image together with its description")
            names = cfg["labels"].get("subcategory")  # class names are saved in the checkpoint
            tokens = tok([args.text]).to(args.device)  # (1, L)
            logits = m.heads["scr"](m.fuse(x, tokens, "scr"))[0]  # (classes,)
            probs, idx = logits.softmax(-1).topk(3)
            print("sub-category:", ", ".join(f"{names[i] if names else i} ({prob:.2f})"
                                             for prob, i in zip(probs.tolist(), idx.tolist())))

        if args.labels:
            labels = [s.strip() for s in args.labels.split(",") if s.strip()]
            prompts = tok([f"a photo of {s.lower()}" for s in labels]).to(args.device)  # (C, L)
            image = unit(m.encode_image(x, task))  # (1, E)
            texts = unit(m.encode_text(prompts, task))  # (C, E)
            sims = (image @ texts.T)[0]  # (C,) cosine
            ranked = sorted(zip(labels, sims.tolist()), key=lambda t: -t[1])  # best first
            print("zero-shot label:", labels[int(sims.argmax())],
                  "(" + ", ".join(f"{s} {v:.3f}" for s, v in ranked) + ")")

        if args.retrieve:
            found = glob.glob(os.path.join(args.retrieve, "**", "*"), recursive=True)
            paths = sorted(f for f in found if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
            if not paths:
                sys.exit(f"no images in {args.retrieve}")
            gallery = []
            for i in range(0, len(paths), 64):  # 64 images at a time
                images = torch.stack([load(f) for f in paths[i:i + 64]]).to(args.device)  # (<= 64, 3, S, S)
                gallery.append(unit(m.encode_image(images, task)))
            gallery = torch.cat(gallery)  # (N, E)
            if args.text:
                query = m.encode_text(tok([args.text]).to(args.device), task)  # (1, E)
            else:
                query = m.encode_image(x, task)
            scores, top = (unit(query) @ gallery.T)[0].topk(min(5, len(paths)))
            print(f"top {len(top)} of {len(paths)} images for the {'text' if args.text else 'image'}:")
            for s, i in zip(scores.tolist(), top.tolist()):
                print(f"  {s:.3f}  {paths[i]}")


if __name__ == "__main__":
    main()
