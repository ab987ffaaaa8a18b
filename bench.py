"""
Speed and memory of FAME-ViL as ratios, measured on one machine in one run: ratios survive a change of
machine better than seconds, and no test asserts a time.

    python bench.py [--batch 4] [--only tsa,decode] [--json OUT]   # ViT-B/16, random weights, no download
    python bench.py --quick                                         # tiny CLIP, small sizes: seconds

Sections: tsa (adapter overhead vs plain open_clip), fusion (vs contrastive step), decode (KV cache vs
recompute), ranking (retrieval's ranking vs encoding cost), loader (data vs the step), flops (per task
step; MFU vs a matmul). The tasks measured are chosen by mode from tasks.ALL: the first contrastive task
(XMR), the first fusion task of an image + text (SCR), the generative one (FIC).
Times are medians of --steps runs after --warmup, a section's variants interleaved (A B A B ...) so that
other processes' load slows them alike.
Targets are ViT-B/16's: for other models the ok? column is bracketed, e.g. "(NO)".
"""
import argparse, ctypes, json, math, os, statistics, tempfile, time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data, model as M, toy
from model import EOT, SOT
from metrics import recall_at_k
from tasks import ALL, TASKS, model_tasks

SECTIONS = ("tsa", "fusion", "decode", "ranking", "loader", "flops")
CLASSES = 121  # FashionGen's sub-categories: the classifier heads' size
N_IMG, N_TXT = 32528, 7519  # FashionGen validation: images, products (4.3 views each)


def sync(dev):  # CUDA runs asynchronously: a timer must wait for the kernels
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, steps, warmup, dev):
    """{name: fn} -> {name: median seconds over `steps` rounds}; one call of each fn per round."""
    times = {k: [] for k in fns}
    for r in range(warmup + steps):
        for k, fn in fns.items():
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn):  # FlopCounterMode counts matmuls, convolutions and attention; elementwise ops are free
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def rss(field):  # bytes, from the kernel's accounting of this process
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_extra(fn, dev):
    """Peak memory fn adds to what is already held. CUDA: the allocator's counters. CPU (Linux only): the
    resident-set high-water mark VmHWM, reset via /proc/self/clear_refs, minus VmRSS before; malloc_trim
    first, so heap pages freed earlier but kept cannot hide a reuse. It counts every page touched (tensors
    and allocator slack): an upper bound on the tensors' own peak."""
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5 = reset the peak RSS to the current RSS
    base = rss("VmRSS")
    fn()
    return rss("VmHWM") - base


def make_batch(B, S, L, dev, seed=0):
    """Random images and FashionGen-like token rows: SOT, words, EOT, zero padding; every task's keys."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(B, L, dtype=torch.long)
    lengths = torch.randint(L // 2, L - 1, (B,), generator=g).tolist()  # long texts, as in FashionGen
    for i, n in enumerate(lengths):
        text[i, 0] = SOT
        text[i, 1:n + 1] = torch.randint(1, SOT, (n,), generator=g)
        text[i, n + 1] = EOT

    def img():  # (B, 3, S, S)
        return torch.randn(B, 3, S, S, generator=g)

    b = {"text": text}
    for key in sorted({k for t in ALL for k in TASKS[t].keys} - {"text"}):  # images, or class labels
        b[key] = img() if key in ("image", "ref", "target") else torch.randint(0, CLASSES, (B,), generator=g)
    return {k: v.to(dev) for k, v in b.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip name, built with random weights")
    p.add_argument("--clip_config",
                   help="a tiny open_clip config instead of --model: JSON text or a .json file")
    p.add_argument("--batch", type=int, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny config and small sizes (the smoke test)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    if only - set(SECTIONS) or a.steps < 1:
        p.error(f"--only takes {','.join(SECTIONS)}; --steps must be >= 1")
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext  # CPU: fp32
    cfg = a.clip_config  # None, JSON text or a .json file
    if cfg:
        cfg = json.load(open(cfg)) if os.path.isfile(cfg) else json.loads(cfg)
    cfg = M.TINY_CLIP if a.quick else cfg
    name = "tiny (--quick)" if a.quick else "custom (--clip_config)" if cfg else a.model
    B = a.batch or (64 if cuda else 8)
    scale = 10 if a.quick else 1  # --quick ranks and loads 1/10 of the sizes
    torch.manual_seed(0)
    # pretrained=None: nothing downloaded
    tasks = model_tasks(ALL, {t: {"subcategory": CLASSES} for t in ALL})
    m = M.FAMEViL(M.build_clip(a.model, None, cfg), tasks).to(dev)
    # the tasks each section measures, by mode: contrastive (XMR), fused image + text (SCR), generative (FIC)
    ct = next(t for t in ALL if TASKS[t].mode == "contrastive")
    ft = next(t for t in ALL if TASKS[t].mode == "fusion" and "image" in TASKS[t].keys)
    gt = next(t for t in ALL if TASKS[t].mode == "generative")
    # fresh adapters add exactly 0: make them count, so decoding also checks the XAA cache
    with torch.no_grad():
        for w in [w for n, w in m.named_parameters() if ".up." in n]:
            w.normal_(0, 0.02)
    S, L = m.image_size, m.context_length
    b = make_batch(B, S, L, dev)
    # one AdamW for everything: parameters a step leaves without gradient (set_to_none) are skipped,
    # as in train.py
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    load0 = os.getloadavg()
    res, rows = {}, []  # results by section; the printed table's rows
    # size targets are ViT-B/16's: elsewhere shown as (yes)
    at_shape = not cfg and a.model.startswith("ViT-B-16")

    def row(what, value, fmt, target="", ok=None, exact=False):
        mark = "" if ok is None else "yes" if ok else "NO"
        if mark and not (exact or at_shape):  # a size target met or missed at another shape
            mark = f"({mark})"
        rows.append((what, fmt.format(value), target, mark))

    def task_loss(t):  # -> a function computing task t's loss on the batch, as train.py does
        return lambda: TASKS[t].loss(m(TASKS[t].logits, b, t), b)

    # the contrastive task on open_clip's own encoders, same weights and batch: no adapter anywhere
    plain = SimpleNamespace(heads=m.heads, encode_image=lambda x, _: m.clip.encode_image(x),
                            encode_text=lambda x, _: m.clip.encode_text(x))

    def plain_loss():
        return TASKS[ct].loss(TASKS[ct].logits(plain, b, ct), b)

    def step(loss_fn, update=True):  # forward + backward (+ AdamW): one training step
        def run():
            with amp():
                loss = loss_fn()
            loss.backward()
            if update:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    # ---- the training steps sections 1, 2, 5 and 6 share, timed together, interleaved
    m.train()
    need = {"plain": {"tsa"}, ct: {"tsa", "fusion", "loader", "flops"}, ft: {"fusion", "flops"}}
    losses = {k: plain_loss if k == "plain" else task_loss(k) for k, used in need.items() if used & only}
    # fwd + bwd FLOPs; counting them is also the first warm-up round
    flops = {k: count_flops(step(fn, update=False)) for k, fn in losses.items()}
    T = timeit({k: step(fn) for k, fn in losses.items()}, a.steps, max(a.warmup - 1, 0), dev)

    if "tsa" in only:  # 1. TSA overhead
        r, fr = T[ct] / T["plain"], flops[ct] / flops["plain"]
        res["tsa"] = dict(plain_step_s=T["plain"], tsa_step_s=T[ct], time_ratio=r, flop_ratio=fr)
        row(f"tsa: step time, {ct} TSA / plain open_clip", r, "{:.3f}x", "<= 1.03x", r <= 1.03)
        row("tsa: FLOPs, TSA / plain", fr, "{:.4f}", "~ 1.013", abs(fr - 1.013) < 0.005)
    if "fusion" in only:  # 2. fusion vs contrastive step
        r, fr = T[ft] / T[ct], flops[ft] / flops[ct]
        res["fusion"] = dict(fusion_step_s=T[ft], contrastive_step_s=T[ct], time_ratio=r, flop_ratio=fr)
        row(f"fusion: step time, {ft} fusion / {ct} contrastive", r, "{:.3f}x", "(tracks FLOPs)")
        row("fusion: FLOPs, fusion / contrastive", fr, "{:.3f}", "~ 1.23", abs(fr - 1.23) < 0.02)
    if "flops" in only:  # FLOPs of the tasks no section times (in train mode, before decoding's eval())
        flops.update({t: count_flops(step(task_loss(t), update=False)) for t in ALL if t not in flops})

    if "decode" in only:  # 3. KV-cached vs recomputed greedy decoding
        # fp32 everywhere (no amp), so the check is exact: both must give the same tokens
        m.eval()
        with torch.no_grad():
            m.heads[gt].bias[EOT] = -1e4  # random weights: never stop early, both decode max_len tokens
        out = {}  # use_cache -> the (B, 1 + n) tokens it decoded

        def gen(cached):
            out[cached] = m.generate(b["image"], gt, max_len=60, use_cache=cached)

        t = timeit({True: lambda: gen(True)}, a.steps, a.warmup, dev)
        # a recomputed run costs ~max_len full forwards (minutes for ViT-B/16 on CPU). Its kernels are warm
        # from the cached runs (same vision forward) and the training steps; at most 2 runs keep the bench
        # affordable
        t.update(timeit({False: lambda: gen(False)}, min(a.steps, 2), 0, dev))
        # both start by encoding the images once (every vision layer's output is the decoder's memory);
        # timed apart, so the speed-up is that of decoding itself
        enc = timeit({0: lambda: m.encode_image(b["image"], gt)}, a.steps, 0, dev)[0]
        same = torch.equal(out[True], out[False])
        n = out[True][:, 1:].numel()  # new tokens, SOT excluded
        cached, recomputed = t[True] - enc, t[False] - enc  # seconds of decoding proper
        res["decode"] = dict(same_tokens=same, tokens=n, image_encoding_s=enc, cached_tok_s=n / cached,
                             recomputed_tok_s=n / recomputed, speedup=recomputed / cached,
                             speedup_with_encoding=t[False] / t[True])
        row("decode: same tokens, cached vs recomputed", same, "{}", "True", same, exact=True)
        row("decode: tokens/s, KV-cached", n / cached, "{:.1f}")
        row("decode: tokens/s, recomputed text prefix", n / recomputed, "{:.1f}")
        row("decode: speed-up (image encoding excluded)", recomputed / cached, "{:.1f}x", ">= 5x",
            recomputed / cached >= 5)
        row("decode: speed-up incl. the image encoding", t[False] / t[True], "{:.1f}x")

    if "ranking" in only:  # 4. retrieval's ranking cost vs the encoding it follows
        ni, nt = N_IMG // scale, N_TXT // scale
        g = torch.Generator().manual_seed(0)
        img = F.normalize(torch.randn(ni, 512, generator=g), dim=-1).to(dev)  # (ni, 512)
        txt = F.normalize(torch.randn(nt, 512, generator=g), dim=-1).to(dev)  # (nt, 512)
        owner = torch.arange(ni) * nt // ni  # (ni,) image -> its product; a product's views are contiguous
        prod = torch.arange(nt)  # (nt,) text -> its product

        def rank():  # I->T, then product-level T->I (a hit if any view is in the top K)
            recall_at_k(img, txt, owner, prod)
            recall_at_k(txt, img, prod, owner)

        mem = peak_extra(rank, dev)  # also the first warm-up
        t_rank = timeit({"rank": rank}, a.steps, max(a.warmup - 1, 0), dev)["rank"]
        m.eval()
        with torch.no_grad(), amp():
            encoders = {"i": lambda: m.encode_image(b["image"], ct),
                        "t": lambda: m.encode_text(b["text"], ct)}
            te = timeit(encoders, a.steps, a.warmup, dev)
        t_enc = math.ceil(ni / B) * te["i"] + math.ceil(nt / B) * te["t"]  # extrapolated from one batch each
        fraction = t_rank / t_enc
        res["ranking"] = dict(images=ni, texts=nt, rank_s=t_rank, encode_s_extrapolated=t_enc,
                          time_fraction=fraction, peak_extra_bytes=mem)
        row(f"ranking: {ni}x{nt}, both directions, s", t_rank, "{:.2f}")
        row(f"ranking: / encoding (extrapolated, batch {B})", fraction, "{:.2%}", "<= 5%",
            fraction <= .05)
        how = "CUDA max_memory_allocated" if cuda else "CPU peak RSS (VmHWM) over before"
        row(f"ranking: peak extra memory, GB ({how})", mem / 1e9, "{:.3f}", "<= 1 GB", mem <= 1e9)

    if "loader" in only:  # 5. images/s of the real loader on ToyFashion vs the training step's samples/s
        step_rate = B / T[ct]
        res["loader"] = dict(step_samples_s=step_rate)
        with tempfile.TemporaryDirectory() as d:
            toy.make_toy(d, products=300 // scale, size=256 // (4 if a.quick else 1))
            tok = data.get_tokenizer("ViT-B-16-quickgelu" if cfg else a.model, context_length=L)
            ds = data.open_dataset("products", d, "train", tok, S, True, {"aug": "crop"})
            for w in (0, 1, 2):
                dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=w,
                                                 drop_last=True, persistent_workers=w > 0, pin_memory=cuda)

                def epoch():  # images per pass over the train split
                    return sum(len(x["image"]) for x in dl)

                n = epoch()  # warm-up pass: starts the workers, fills the page cache
                rate = n / timeit({"epoch": epoch}, a.steps, max(a.warmup - 1, 0), dev)["epoch"]
                ratio = rate / step_rate
                res["loader"][f"workers{w}_img_s"] = rate
                res["loader"][f"workers{w}_ratio"] = ratio
                row(f"loader: {w} workers, img/s ({rate:.0f}) / step samples/s ({step_rate:.1f})", ratio,
                    "{:.1f}x", "> 1", ratio > 1)
                del dl

    if "flops" in only:  # 6. FLOPs per training step, achieved FLOP/s, MFU against a plain matmul here
        n = 1024 if a.quick else 2048
        dtype = torch.bfloat16 if cuda else torch.float32
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        mm = 2 * n ** 3 / timeit({"mm": lambda: x @ y}, a.steps, a.warmup, dev)["mm"]
        per_task = {f"{t}_flops": float(flops[t]) for t in ALL}
        res["flops"] = dict(per_task, matmul_flop_s=mm)
        for t in ALL:
            row(f"flops: {t} step (fwd+bwd, batch {B}), GFLOP", flops[t] / 1e9, "{:.1f}")
        row(f"flops: {n}x{n} {str(dtype)[6:]} matmul, GFLOP/s", mm / 1e9, "{:.1f}")
        for t in (ct, ft):  # the two steps timed above
            flop_s = flops[t] / T[t]
            res["flops"][f"{t}_flop_s"] = flop_s
            res["flops"][f"{t}_mfu"] = flop_s / mm
            # the MFU goes in now; row() fills "{:.1f}" with the GFLOP/s
            fmt = "{:.1f} (%.0f%%)" % (100 * flops[t] / T[t] / mm)
            row(f"flops: {t} step, GFLOP/s (MFU vs matmul)", flop_s / 1e9, fmt)

    meta = dict(model=name, device=str(dev), batch=B, steps=a.steps, warmup=a.warmup,
                threads=torch.get_num_threads(), torch=torch.__version__, loadavg_start=load0[0],
                loadavg_end=os.getloadavg()[0])
    print(f"FAME-ViL bench: {name} on {dev} ({meta['threads']} threads), batch {B}, median of {a.steps} "
          f"after {a.warmup} warm-up; load average {load0[0]:.2f} -> {meta['loadavg_end']:.2f}")
    w = max(len(r[0]) for r in rows)
    for r in [("section", "measured", "target", "ok?")] + rows:
        print(f"{r[0]:<{w}}  {r[1]:>14}  {r[2]:>14}  {r[3]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, **res), f, indent=1)
    return res


if __name__ == "__main__":
    main()
