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
import argparse, ctypes, gc, json, math, os, statistics, tempfile, time, warnings
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cli, data, model as M, toy
from model import EOT, SOT
from metrics import recall_at_k
from tasks import ALL, FASHIONGEN_CLASSES, TASKS, model_tasks

SECTIONS = ("tsa", "fusion", "decode", "ranking", "loader", "flops")
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
    """Random images and FashionGen-like token rows: SOT, words, EOT, zero padding; every task's keys (a
    label attribute gets random classes of its FashionGen count)."""
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
        b[key] = img() if key in ("image", "ref", "target") else \
            torch.randint(0, FASHIONGEN_CLASSES[key], (B,), generator=g)
    return {k: v.to(dev) for k, v in b.items()}


def setup(a):
    """What every section shares: the model (every task of tasks.ALL, random weights, nothing downloaded), a
    batch, an optimizer, the tasks measured (chosen by mode) and the table's rows."""
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    cfg = a.clip_config  # None, JSON text or a .json file
    if cfg:
        cfg = json.load(open(cfg)) if os.path.isfile(cfg) else json.loads(cfg)
    cfg = toy.TINY_CLIP if a.quick else cfg
    B = a.batch or (64 if cuda else 8)
    torch.manual_seed(0)
    m = M.FAMEViL(M.build_clip(a.model, None, cfg), model_tasks(ALL, {t: FASHIONGEN_CLASSES for t in ALL}))
    m = m.to(dev)
    with torch.no_grad():  # fresh adapters add exactly 0: make them count (decoding checks the XAA cache)
        for w in [w for n, w in m.named_parameters() if ".up." in n]:
            w.normal_(0, 0.02)
    modes = {mode: next(t for t in ALL if TASKS[t].mode == mode and "image" in TASKS[t].keys)
             for mode in ("contrastive", "fusion", "generative")}
    return SimpleNamespace(
        a=a, dev=dev, cuda=cuda, m=m, B=B, cfg=cfg, b=make_batch(B, m.image_size, m.context_length, dev),
        amp=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext,  # CPU: fp32
        # one AdamW for everything: parameters a step leaves without gradient (set_to_none) are skipped,
        # as in train.py
        opt=torch.optim.AdamW(m.parameters(), lr=1e-6), scale=10 if a.quick else 1,  # --quick: 1/10 sizes
        name="tiny (--quick)" if a.quick else "custom (--clip_config)" if cfg else a.model,
        ct=modes["contrastive"], ft=modes["fusion"], gt=modes["generative"],  # XMR, SCR, FIC
        at_shape=not cfg and a.model.startswith("ViT-B-16"),  # size targets are ViT-B/16's: else "(yes)"
        rows=[])


def row(c, what, value, fmt, target="", ok=None, exact=False):  # one line of the printed table
    mark = "" if ok is None else "yes" if ok else "NO"
    if mark and not (exact or c.at_shape):  # a size target met or missed at another shape
        mark = f"({mark})"
    c.rows.append((what, fmt.format(value), target, mark))


def step(c, loss_fn, update=True):  # forward + backward (+ AdamW): one training step
    def run():
        with c.amp():
            loss = loss_fn()
        loss.backward()
        if update:
            c.opt.step()
        c.opt.zero_grad(set_to_none=True)
    return run


def task_loss(c, t):  # -> a function computing task t's loss on the batch, as train.py does
    return lambda: TASKS[t].loss(TASKS[t].logits(c.m, c.b, t), c.b)


def training_steps(c, only):
    """The training steps the tsa, fusion, loader and flops sections share, timed together, interleaved:
    {name: median s} and {name: FLOPs}; "plain" is the contrastive task on open_clip's own encoders (same
    weights and batch, no adapter anywhere)."""
    plain = SimpleNamespace(heads=c.m.heads, encode_image=lambda x, _: c.m.clip.encode_image(x),
                            encode_text=lambda x, _: c.m.clip.encode_text(x))
    need = {"plain": {"tsa"}, c.ct: {"tsa", "fusion", "loader", "flops"}, c.ft: {"fusion", "flops"}}
    losses = {k: (lambda: TASKS[c.ct].loss(TASKS[c.ct].logits(plain, c.b, c.ct), c.b)) if k == "plain"
              else task_loss(c, k) for k, used in need.items() if used & only}
    c.m.train()
    # fwd + bwd FLOPs; counting them is also the first warm-up round
    flops = {k: count_flops(step(c, fn, update=False)) for k, fn in losses.items()}
    T = timeit({k: step(c, fn) for k, fn in losses.items()}, c.a.steps, max(c.a.warmup - 1, 0), c.dev)
    if "flops" in only:  # every other task's FLOPs, in train mode too
        flops.update({t: count_flops(step(c, task_loss(c, t), update=False)) for t in ALL if t not in flops})
    return T, flops


def bench_tsa(c, T, flops):  # 1. the TSA's overhead over the plain open_clip step
    r, fr = T[c.ct] / T["plain"], flops[c.ct] / flops["plain"]
    row(c, f"tsa: step time, {c.ct} TSA / plain open_clip", r, "{:.3f}x", "<= 1.03x", r <= 1.03)
    row(c, "tsa: FLOPs, TSA / plain", fr, "{:.4f}", "~ 1.013", abs(fr - 1.013) < 0.005)
    return dict(plain_step_s=T["plain"], tsa_step_s=T[c.ct], time_ratio=r, flop_ratio=fr)


def bench_fusion(c, T, flops):  # 2. a fusion step against a contrastive one
    r, fr = T[c.ft] / T[c.ct], flops[c.ft] / flops[c.ct]
    row(c, f"fusion: step time, {c.ft} fusion / {c.ct} contrastive", r, "{:.3f}x", "(tracks FLOPs)")
    row(c, "fusion: FLOPs, fusion / contrastive", fr, "{:.3f}", "~ 1.23", abs(fr - 1.23) < 0.02)
    return dict(fusion_step_s=T[c.ft], contrastive_step_s=T[c.ct], time_ratio=r, flop_ratio=fr)


def bench_decode(c):
    """3. KV-cached against recomputed greedy decoding, fp32 everywhere (no amp), so both must give exactly
    the same tokens."""
    m, a, images = c.m, c.a, c.b["image"]
    m.eval()
    with torch.no_grad():
        m.heads[c.gt].bias[EOT] = -1e4  # random weights: never stop early, both decode max_len tokens
    out = {}  # use_cache -> the (B, 1 + n) tokens it decoded

    def gen(cached):
        out[cached] = m.generate(images, c.gt, max_len=60, use_cache=cached)

    t = timeit({True: lambda: gen(True)}, a.steps, a.warmup, c.dev)
    # a recomputed run costs ~max_len full forwards (minutes for ViT-B/16 on CPU). Its kernels are warm from
    # the cached runs (same vision forward) and the training steps; at most 2 runs keep the bench affordable
    t.update(timeit({False: lambda: gen(False)}, min(a.steps, 2), 0, c.dev))
    # both start by encoding the images once (every vision layer's output is the decoder's memory); timed
    # apart, so the speed-up is that of decoding itself
    enc = timeit({0: lambda: m.encode_image(images, c.gt)}, a.steps, 0, c.dev)[0]
    same = torch.equal(out[True], out[False])
    n = out[True][:, 1:].numel()  # new tokens, SOT excluded
    cached, recomputed = t[True] - enc, t[False] - enc  # seconds of decoding proper
    row(c, "decode: same tokens, cached vs recomputed", same, "{}", "True", same, exact=True)
    row(c, "decode: tokens/s, KV-cached", n / cached, "{:.1f}")
    row(c, "decode: tokens/s, recomputed text prefix", n / recomputed, "{:.1f}")
    row(c, "decode: speed-up (image encoding excluded)", recomputed / cached, "{:.1f}x", ">= 5x",
        recomputed / cached >= 5)
    row(c, "decode: speed-up incl. the image encoding", t[False] / t[True], "{:.1f}x")
    return dict(same_tokens=same, tokens=n, image_encoding_s=enc, cached_tok_s=n / cached,
                recomputed_tok_s=n / recomputed, speedup=recomputed / cached,
                speedup_with_encoding=t[False] / t[True])


def bench_ranking(c):  # 4. retrieval's ranking cost against the encoding it follows, at FashionGen's size
    ni, nt, a = N_IMG // c.scale, N_TXT // c.scale, c.a
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(ni, 512, generator=g), dim=-1).to(c.dev)  # (ni, 512)
    txt = F.normalize(torch.randn(nt, 512, generator=g), dim=-1).to(c.dev)  # (nt, 512)
    owner = torch.arange(ni) * nt // ni  # (ni,) image -> its product; a product's views are contiguous
    prod = torch.arange(nt)  # (nt,) text -> its product

    def rank():  # I->T, then product-level T->I (a hit if any view is in the top K)
        recall_at_k(img, txt, owner, prod)
        recall_at_k(txt, img, prod, owner)

    mem = peak_extra(rank, c.dev)  # also the first warm-up
    t_rank = timeit({"rank": rank}, a.steps, max(a.warmup - 1, 0), c.dev)["rank"]
    c.m.eval()
    with torch.no_grad(), c.amp():
        te = timeit({"i": lambda: c.m.encode_image(c.b["image"], c.ct),
                     "t": lambda: c.m.encode_text(c.b["text"], c.ct)}, a.steps, a.warmup, c.dev)
    t_enc = math.ceil(ni / c.B) * te["i"] + math.ceil(nt / c.B) * te["t"]  # extrapolated from one batch each
    fraction = t_rank / t_enc
    row(c, f"ranking: {ni}x{nt}, both directions, s", t_rank, "{:.2f}")
    row(c, f"ranking: / encoding (extrapolated, batch {c.B})", fraction, "{:.2%}", "<= 5%", fraction <= .05)
    how = "CUDA max_memory_allocated" if c.cuda else "CPU peak RSS (VmHWM) over before"
    row(c, f"ranking: peak extra memory, GB ({how})", mem / 1e9, "{:.3f}", "<= 1 GB", mem <= 1e9)
    return dict(images=ni, texts=nt, rank_s=t_rank, encode_s_extrapolated=t_enc, time_fraction=fraction,
                peak_extra_bytes=mem)


def pss(pid):
    """A process's proportional set size (its private pages + its share of pages it shares), bytes: in all,
    anonymous (its own heap) and file-backed (memory maps and the page cache, shared between processes). Freed
    heap pages are given back first (this process's), so that they do not count."""
    if pid == os.getpid():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith("Pss")}
    return {k: 1024 * kb.get(k, 0) for k in ("Pss", "Pss_Anon", "Pss_File")}


def children(pid):  # the pids whose parent is pid (a DataLoader's workers)
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p))
        except (OSError, IndexError, ValueError):
            pass  # a process that ended meanwhile
    return kids


def loader_run(ds, batch, workers, c, base):
    """(images/s, {PSS kind: bytes the loader adds}) of a training loader with that many worker processes,
    measured while its workers are alive; they end when it does, on return."""
    loader = data.stream(ds, data.shard_batches(len(ds), batch, 0, 1, 0, 0, 0), workers)
    per_epoch = len(ds) // batch

    def epoch():  # one pass over the train split
        return [next(loader) for _ in range(per_epoch)]

    epoch()  # warm-up pass: starts the workers, fills the page cache
    rate = per_epoch * batch / timeit({"epoch": epoch}, c.a.steps, max(c.a.warmup - 1, 0), c.dev)["epoch"]
    mem = [pss(p) for p in [os.getpid(), *children(os.getpid())]]  # the workers are alive: persistent
    return rate, {k: sum(m[k] for m in mem) - base[k] for k in base}


def bench_loader(c, T):
    """5. The training loader on ToyFashion at the model's image size, batches of 64 (the global batch):
    images/s of one loader process (0 workers: the main process loads), the same with 1 and 4 workers, against
    the training step's samples/s; and the memory the loader adds to the process (PSS of the main process
    and its workers, summed, less the main process's before), so that a copy of the data per worker shows."""
    step_rate, size = c.B / T[c.ct], c.m.image_size
    res, batch = dict(step_samples_s=step_rate), 64 // c.scale
    with tempfile.TemporaryDirectory() as d:
        toy.make_toy(d, products=600 // c.scale, size=data.side(size), image_size=size)
        ds = data.open_dataset("products", d, "train", c.m.context_length, size, True, {"aug": "crop"})
        base = pss(os.getpid())  # the bench's own process (the model, the optimizer, the dataset): no loader
        for w in (0, 1, 4):
            rate, total = loader_run(ds, batch, w, c, base)
            res.update({f"workers{w}_img_s": rate, f"workers{w}_pss": total["Pss"],
                        f"workers{w}_pss_anon": total["Pss_Anon"], f"workers{w}_pss_file": total["Pss_File"]})
            target = dict(target=">= 5000", ok=rate >= 5000) if w == 0 else {}  # the goal: one process
            row(c, f"loader: {w} workers, images/s at {size} px", rate, "{:.0f}", **target)
            split = "{:.3f} (%.3f + %.3f)" % (total["Pss_Anon"] / 1e9, total["Pss_File"] / 1e9)
            row(c, f"loader: {w} workers, memory it adds, GB (PSS of {w + 1} processes: anon + file)",
                total["Pss"] / 1e9, split)
        row(c, f"loader: one process / training step, samples/s (step {step_rate:.1f})",
            res["workers0_img_s"] / step_rate, "{:.1f}x", "> 1", res["workers0_img_s"] > step_rate)
    return res


def bench_flops(c, T, flops):  # 6. FLOPs per training step, achieved FLOP/s, MFU against a plain matmul here
    a = c.a
    n = 1024 if a.quick else 2048
    dtype = torch.bfloat16 if c.cuda else torch.float32
    x, y = torch.randn(n, n, device=c.dev, dtype=dtype), torch.randn(n, n, device=c.dev, dtype=dtype)
    mm = 2 * n ** 3 / timeit({"mm": lambda: x @ y}, a.steps, a.warmup, c.dev)["mm"]
    res = {f"{t}_flops": float(flops[t]) for t in ALL}
    res["matmul_flop_s"] = mm
    for t in ALL:
        row(c, f"flops: {t} step (fwd+bwd, batch {c.B}), GFLOP", flops[t] / 1e9, "{:.1f}")
    row(c, f"flops: {n}x{n} {str(dtype)[6:]} matmul, GFLOP/s", mm / 1e9, "{:.1f}")
    for t in (c.ct, c.ft):  # the two steps timed in training_steps
        flop_s = flops[t] / T[t]
        res[f"{t}_flop_s"], res[f"{t}_mfu"] = flop_s, flop_s / mm
        fmt = "{:.1f} (%.0f%%)" % (100 * flop_s / mm)  # the MFU goes in now; row() fills in the GFLOP/s
        row(c, f"flops: {t} step, GFLOP/s (MFU vs matmul)", flop_s / 1e9, fmt)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=M.CLIP_MODEL, help="open_clip name, built with random weights")
    p.add_argument("--clip_config", help="an open_clip config instead of --model: JSON text or a .json file")
    p.add_argument("--batch", type=int, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=5, help="timed runs of each variant (their median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--only", default=",".join(SECTIONS), help="a comma list of " + ",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny config and small sizes (the smoke test)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    if only - set(SECTIONS) or a.steps < 1:
        raise ValueError(f"--only takes a comma list of {','.join(SECTIONS)}; --steps must be >= 1")
    c, load0 = setup(a), os.getloadavg()
    warnings.filterwarnings("ignore", "This DataLoader will create")  # 4 workers on 2 cores: measured anyway
    res = {}
    if only & {"tsa", "fusion", "loader", "flops"}:
        T, flops = training_steps(c, only)
    if "tsa" in only:
        res["tsa"] = bench_tsa(c, T, flops)
    if "fusion" in only:
        res["fusion"] = bench_fusion(c, T, flops)
    if "decode" in only:
        res["decode"] = bench_decode(c)
    if "ranking" in only:
        res["ranking"] = bench_ranking(c)
    if "loader" in only:
        res["loader"] = bench_loader(c, T)
    if "flops" in only:
        res["flops"] = bench_flops(c, T, flops)
    meta = dict(model=c.name, device=str(c.dev), batch=c.B, steps=a.steps, warmup=a.warmup,
                threads=torch.get_num_threads(), torch=torch.__version__, loadavg_start=load0[0],
                loadavg_end=os.getloadavg()[0])
    print(f"FAME-ViL bench: {c.name} on {c.dev} ({meta['threads']} threads), batch {c.B}, median of "
          f"{a.steps} after {a.warmup} warm-up; load average {load0[0]:.2f} -> {meta['loadavg_end']:.2f}")
    w = max(len(r[0]) for r in c.rows)
    for r in [("section", "measured", "target", "ok?")] + c.rows:
        print(f"{r[0]:<{w}}  {r[1]:>14}  {r[2]:>14}  {r[3]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, **res), f, indent=1)
    return res


if __name__ == "__main__":
    cli.command_line(main)
