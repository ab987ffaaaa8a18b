"""
Pretrain the toy's CLIP with CLIP's own objective, so that FAME-ViL can be tried in the regime its paper is
about: a pretrained backbone that fine-tuning barely moves, the task-specific capacity in the adapters.

    python pretrain.py          # draws the corpus (toy.make_corpus), trains, writes out-pretrain/toy_clip.pt,
                                # then evaluate.py's zero-shot recognition and XMR retrieval on ToyFashion
    python pretrain.py --quick  # the tests' tiny CLIP, a small corpus, a few steps: seconds

The objective is open_clip's contrastive loss (ClipLoss) with its learnable temperature; AdamW with CLIP's
betas (0.9, 0.98), no decay on tensors of fewer than 2 dims; a linear warmup, then a cosine. No adapter: the
model is open_clip's CLIP as it is. Resumable exactly (out_dir/ckpt.pt; the data order is a pure function of
the step) and cached: a second call with a finished toy_clip.pt trains nothing. toy_clip.pt is an open_clip
checkpoint: train.py --pretrained FILE loads it through open_clip's own load_checkpoint, the path of OpenAI's
weights downloaded by hand.
"""
import argparse
import json
import math
import os
import time

import torch
from open_clip.loss import ClipLoss

import cli
import data
import evaluate
import toy
import train
from model import build_clip, read_checkpoint


def lr_at(step, a):  # linear warmup over a.warmup steps, then a cosine down to 0 at a.steps
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    return a.lr * 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))


def save(path, obj):  # atomically: a killed run keeps its previous file
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def pretrain(a, config):
    """Train (or resume) open_clip's CLIP on the corpus; returns the path of the finished toy_clip.pt."""
    final, ckpt_path = os.path.join(a.out_dir, "toy_clip.pt"), os.path.join(a.out_dir, "ckpt.pt")
    if os.path.isfile(final):
        print(f"{final}: pretrained already, reused")
        return final
    if not os.path.isdir(a.corpus):
        print(f"drawing the corpus into {a.corpus} ...")
        toy.make_corpus(a.corpus, a.seed, a.images, size=config["vision_cfg"]["image_size"])
    context, size = config["text_cfg"]["context_length"], config["vision_cfg"]["image_size"]
    ds = data.open_dataset("products", a.corpus, "train", context, size, True, {"aug": "crop"})
    torch.manual_seed(a.seed)
    clip = build_clip(config=config)
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    rest = [p for p in clip.parameters() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=a.weight_decay), dict(params=rest, weight_decay=0.)]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    if os.path.isfile(ckpt_path):  # resume where it stopped
        ckpt = read_checkpoint(ckpt_path)
        clip.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        print(f"resumed {ckpt_path} at step {step}")
    os.makedirs(a.out_dir, exist_ok=True)
    loss_fn, log = ClipLoss(), open(os.path.join(a.out_dir, "log.jsonl"), "a", buffering=1)
    stream = data.stream(ds, data.shard_batches(len(ds), a.batch_size, 0, 1, a.seed, 0, step), 0)
    size = sum(p.numel() for p in clip.parameters()) / 1e6
    print(f"pretraining CLIP ({size:.2f} M parameters) on {len(ds)} images of {a.corpus}, {a.steps} steps of "
          f"{a.batch_size}")
    clip.train()
    t0, step0 = time.time(), step
    while step < a.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        batch = data.to_device(next(stream), "cpu")
        image, text, scale = clip(batch["image"], batch["text"])  # unit features, exp(learnable log scale)
        loss = loss_fn(image, text, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: a temperature of at most 100
            clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % a.log_interval == 0 or step == a.steps:
            row = dict(step=step, loss=loss.item(), scale=scale.item(), lr=lr_at(step - 1, a),
                       samples_per_s=round(a.batch_size * (step - step0) / (time.time() - t0), 1))
            print("step {step:>6} loss {loss:.4f} temperature 1/{scale:.1f} lr {lr:.2e} {samples_per_s} "
                  "samples/s".format(**row), flush=True)
            log.write(json.dumps(row) + "\n")
        if step % a.ckpt_interval == 0 or step == a.steps:
            save(ckpt_path, dict(model=clip.state_dict(), optimizer=opt.state_dict(), step=step))
    save(final, dict(state_dict=clip.state_dict(), config=config, steps=a.steps, corpus=a.corpus))
    print(f"done: {final} ({(time.time() - t0) / 60:.1f} min of training this call)")
    return final


def zero_shot_report(final, a, config):
    """evaluate.py on ToyFashion validation with the pretrained CLIP and nothing trained: a step-0 XMR
    checkpoint (its fresh TSA adds exactly 0) -> retrieval (full, random-100) and zero-shot recognition."""
    report = os.path.join(a.out_dir, "zero_shot.json")
    if os.path.isfile(report) and os.path.getmtime(report) > os.path.getmtime(final):  # cached, as toy_clip.pt
        print(f"zero-shot report of {final}: {report} (cached)")
        return json.load(open(report))
    out = os.path.join(a.out_dir, "step0")
    flags = ["--preset", "demo", "--task", "xmr", "--max_iters", "0", "--pretrained", final, "--out_dir", out,
             "--final_eval", "false", "--clip_config", json.dumps(config), "--data", a.toy, "--toy", a.toy,
             "--context_length", str(config["text_cfg"]["context_length"])]
    train.main(flags)
    return evaluate.main([os.path.join(out, "ckpt.pt"), "--workers", "0", "--json", report])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="data/corpus", help="the prepared corpus (drawn there if missing)")
    p.add_argument("--images", type=int, default=30000, help="images of the corpus when drawn")
    p.add_argument("--toy", default="data/toy", help="ToyFashion, where it is evaluated (drawn if missing)")
    p.add_argument("--out_dir", default="out-pretrain", help="ckpt.pt (resumable), toy_clip.pt, log.jsonl")
    p.add_argument("--steps", type=int, default=2000, help="steps of --batch_size pairs")
    p.add_argument("--batch_size", type=int, default=128, help="CLIP's negatives are the batch's other pairs")
    p.add_argument("--lr", type=float, default=1e-3, help="the peak learning rate")
    p.add_argument("--warmup", type=int, default=150, help="linear warmup steps")
    p.add_argument("--weight_decay", type=float, default=0.1, help="on tensors of 2 dims or more")
    p.add_argument("--log_interval", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt_interval", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="the corpus, the initialisation, the data order")
    p.add_argument("--quick", action="store_true", help="the tests' tiny CLIP, 400 images, 20 steps")
    a = p.parse_args(argv)
    config = toy.TINY_CLIP if a.quick else toy.CLIP
    if a.quick:
        a.images, a.steps, a.warmup, a.log_interval = min(a.images, 400), min(a.steps, 20), 5, 5
        a.batch_size = 16
    final = pretrain(a, config)
    if not os.path.isdir(a.toy):
        print(f"generating ToyFashion into {a.toy} ...")
        toy.make_toy(a.toy, size=config["vision_cfg"]["image_size"])
    return final, zero_shot_report(final, a, config)


if __name__ == "__main__":
    cli.command_line(main)
