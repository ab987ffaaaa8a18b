"""
Train FAME-ViL: one task per step, drawn in proportion to dataset size, optionally distilled from
single-task teachers (Sec. 3.2). One process on a CPU/GPU, or many with torchrun:

    python train.py --preset demo                                    # ToyFashion, tiny CLIP, CPU, minutes
    python train.py --task scr --preset teacher --out_dir out/scr    # a single-task teacher (STL)
    torchrun --nproc_per_node=4 train.py --task all --teachers out/teachers

Every key of `config` below is a flag (--key value; --help shows its comment); a preset overrides the
defaults first, the command line last. Defaults are the paper's Table 5.
"""
import fnmatch, itertools, json, math, os, random, sys, time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import data
import toy
from data import seed_of, shard_batches
from distill import distill_loss, load_teacher
from model import CLIP_MODEL, build, image_size, read_checkpoint
from tasks import TASKS, describe, model_tasks, rank_mean, same_on_all_ranks, select, swap_modality

# ----------------------------------------------------------------------------- config (Table 5)
config = dict(
    task="all",  # all (FAME-ViL's four tasks) | a comma list; one task = a single-task run (a teacher)
    data="data/fashion",  # prepared ROOT (python prepare.py ...); ROOT,task=ROOT2 gives a task its own
    toy="",  # generate ToyFashion at this path if it is missing (the demo's own data path only)
    out_dir="out",  # checkpoints (ckpt.pt, best.pt) and log.jsonl
    model=CLIP_MODEL,  # open_clip name; OpenAI weights need ViT-B-16-quickgelu
    pretrained="openai",  # open_clip tag; '' = random init. The only network access of this project
    clip_config={},  # an open_clip CLIP config dict (JSON): builds that architecture instead of `model`
    context_length=77,  # text tokens (<= 77, the prepared length): longer texts are cut, keeping EOT
    bottleneck=64, tsa=True, xaa=True,  # Table 4's architecture rows
    fusion="add",  # add (the paper's sum) | modality (CMA-CLIP's modality-wise attention)
    cma_depth=2, cma_heads=4,  # CMA-CLIP's sequence-wise transformer (the paper: 12 layers, 8 heads)
    modality_noise=0.0,  # CMA-CLIP's noise: this fraction of a batch gets another sample's text or image
    teachers="",  # directory with <task>.pt single-task checkpoints -> multi-teacher distillation
    sampler="size",  # size (p ~ |D_task|) | uniform | round_robin   (Table 4 rows 9-11)
    max_iters=90_000,  # training steps, all tasks together
    batch_size=64,  # global, split over the ranks
    lr=1e-4, backbone_lr=1e-6,  # adapters, XAA and heads / the CLIP backbone (fully fine-tuned)
    weight_decay=1e-5, beta1=0.9, beta2=0.999,  # AdamW; no decay on biases, norms and scalars
    warmup_iters=10_000, warmup_factor=0.25,  # linear warmup of the LR from warmup_factor
    lr_steps=(50_000, 80_000), lr_gamma=0.1,  # the LR is multiplied by lr_gamma at each of these steps
    grad_clip=0.0,  # 0 = off, as in the paper
    aug="crop",  # crop: Resize(256) -> RandomCrop(224) -> flip (the supplement) | rrc: the authors' code's
    train_only="",  # comma list of parameter-name patterns (fnmatch) to train, the rest frozen; '' = all
    cma_stage="",  # warmup | end2end | tune: CMA-CLIP's Algorithm 1 (chain stages with --init_from)
    init_from="",  # start from another run's weights (new optimizer, step 0)
    resume=False,  # continue the run in out_dir from its last checkpoint
    log_interval=10, eval_interval=2000, ckpt_interval=1000,  # in steps
    eval_batches=20,  # validation batches per task at each eval_interval (metrics: evaluate.py)
    final_eval=False,  # run evaluate.py on the final checkpoint (the demo does)
    num_workers=4,  # DataLoader workers per task
    seed=0,  # everything random is a function of it: init, task draws, data order, augmentation
    dtype="bfloat16",  # autocast dtype on CUDA; CPU runs fp32
)
presets = {
    "demo": dict(data="data/toy", toy="data/toy", out_dir="out-demo", pretrained="", clip_config=toy.CLIP,
                 context_length=32, bottleneck=32, batch_size=32, max_iters=800, lr=1e-3, backbone_lr=1e-3,
                 warmup_iters=50, lr_steps=(650,), eval_interval=800, eval_batches=10, ckpt_interval=400,
                 num_workers=0, final_eval=True),  # one validation pass, at the end: evaluate.py's report follows
    # the authors' single-task runs: the same recipe, shorter, no warmup, one LR step (supplement, Sec. A)
    "teacher": dict(max_iters=30_000, warmup_iters=0, lr_steps=(20_000,)),  # FashionGen tasks
    "teacher_tgir": dict(max_iters=6_000, warmup_iters=0, lr_steps=(4_000,)),  # FashionIQ
}
# CMA-CLIP's Algorithm 1 for --task cma: what each stage trains, all at lr 1e-5 (its lines 4, 18 and 23). By
# parameter name: in a run with other tasks, "heads.*" is every task's head
CMA_STAGES = {
    "warmup": dict(train_only="heads.*", lr=1e-5, backbone_lr=1e-5),  # CLIP and every adapter frozen
    "end2end": dict(train_only="", lr=1e-5, backbone_lr=1e-5),  # everything
    "tune": dict(train_only="heads.*.modality.*,heads.*.mlp.*", lr=1e-5, backbone_lr=1e-5),  # sequence frozen
}
CHOICES = dict(sampler=("size", "uniform", "round_robin"), fusion=("add", "modality"), aug=("crop", "rrc"),
               cma_stage=("", *CMA_STAGES))


def parse_config(argv):
    """defaults <- preset <- CMA-CLIP stage <- command line -> (config, the keys the command line gave,
    notes to print: what a preset changed or warns about)."""
    p = cli.config_parser(config, __file__, __doc__, presets, CHOICES,
                          shown=lambda v: "toy.CLIP" if v is toy.CLIP else repr(v))
    given = vars(p.parse_args(argv))
    name = given.pop("preset", None)
    preset, notes = cli.preset(presets, name, given, config)
    if name == "demo" and {"task", "data"} & given.keys() and "out_dir" not in given:
        notes.append(f"warning: --preset demo writes to {preset['out_dir']}, over the demo's own run: give "
                     f"--out_dir to keep this run apart")
    stage = CMA_STAGES.get(given.get("cma_stage", preset.get("cma_stage", "")), {})
    return {**config, **preset, **stage, **given}, given, notes


# ----------------------------------------------------------------------------- pure functions of the step
def lr_factor(step, cfg):
    """Linear warmup from warmup_factor, then x lr_gamma at each of lr_steps (Table 5)."""
    if step < cfg["warmup_iters"]:
        warm = cfg["warmup_factor"] + (1 - cfg["warmup_factor"]) * step / cfg["warmup_iters"]
    else:
        warm = 1.0
    return warm * cfg["lr_gamma"] ** sum(step >= s for s in cfg["lr_steps"])


def draw_task(step, names, probs, cfg):
    """The task of a step: a function of (seed, step) only, so every rank draws the same task with no
    communication, and a resumed run continues the same sequence."""
    if cfg["sampler"] == "round_robin":
        return names[step % len(names)]
    g = torch.Generator().manual_seed(seed_of(cfg["seed"], "task", step))
    return names[torch.multinomial(probs, 1, generator=g).item()]


def task_probs(sizes, sampler):  # size-proportional (the paper's), or uniform for the ablation
    w = torch.tensor([float(n) for n in sizes]) if sampler == "size" else torch.ones(len(sizes))
    return w / w.sum()


# ----------------------------------------------------------------------------- setup and guards
def param_groups(model, cfg):
    """AdamW groups: the CLIP backbone's learning rate or the adapters' and heads'; weight decay by rank:
    every matrix decays (weights, embeddings, the positional ones included), no tensor of fewer than 2 dims
    does (biases, norms, scalar scales, CLIP's class embedding, a modality-wise attention's w). Parameters
    outside `train_only` are frozen and left out (CLIP's logit_scale is in; FAME-ViL never gives it a
    gradient)."""
    patterns = [f for f in cfg["train_only"].split(",") if f]
    groups = {}
    for name, p in model.named_parameters():
        p.requires_grad_(not patterns or any(fnmatch.fnmatchcase(name, f) for f in patterns))
        if p.requires_grad:
            groups.setdefault((name.startswith("clip."), p.ndim >= 2), []).append(p)
    return [dict(params=ps, base_lr=cfg["backbone_lr"] if backbone else cfg["lr"],
                 weight_decay=cfg["weight_decay"] if decay else 0.0)
            for (backbone, decay), ps in sorted(groups.items())]


def setup_distributed():  # -> (rank, world, device); torchrun sets RANK. NCCL on GPUs, gloo on CPUs
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if cuda else "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def open_data(cfg, names, master):
    """(train sets, val sets): each task's row layout from its root (--data ROOT,task=ROOT). ToyFashion is
    drawn only at its own path (--toy), never into a --data that happens to be missing."""
    roots = cli.data_roots(cfg["data"], names)
    if cfg["toy"] in roots.values():
        if master and not os.path.isdir(cfg["toy"]):
            print(f"generating ToyFashion into {cfg['toy']} ...")
            toy.make_toy(cfg["toy"])
        if dist.is_initialized():
            dist.barrier()
    layouts, keys = {t: TASKS[t].data for t in names}, {t: TASKS[t].keys for t in names}
    shape = cfg["context_length"], image_size(cfg["model"], cfg["clip_config"])  # what the model reads
    # a task whose data lacks a key it reads, or holds less than a batch, stops now, named
    train_sets = data.open_datasets(layouts, roots, "train", *shape, True, cfg, keys)
    for t in names:
        if len(train_sets[t]) < cfg["batch_size"]:
            raise ValueError(f"task {t}: {len(train_sets[t])} training samples under {roots[t]}, fewer than "
                             f"one global batch of {cfg['batch_size']}")
    return train_sets, data.open_datasets(layouts, roots, "val", *shape, False, cfg)


class TaskLogits(torch.nn.Module):  # what DDP wraps: a step's logits in one forward, to see what they used

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, task):
        return TASKS[task].logits(self.model, batch, task)


def settle(window, tasks, first, names, last_good):
    """The losses of the steps first.. since the last check, (n, 3) on the device, averaged over the ranks and
    read: the loop's one look at the device between log intervals. Every rank reads the same numbers, so a
    non-finite loss stops them all together, naming its step, its task and the last good checkpoint; the
    tasks drawn are checked to agree across ranks again. -> the last step's (loss, task loss, kd)."""
    same_on_all_ranks(torch.tensor([names.index(t) for t in tasks], device=window.device), f"steps {first}..")
    rows = rank_mean(window.clone()).tolist()
    for k, (row, task) in enumerate(zip(rows, tasks)):
        if not all(map(math.isfinite, row)):
            raise FloatingPointError(f"step {first + k}: loss is {row[0]} on task {task}; stopped. "
                                     f"Last good checkpoint: {last_good}")
    return rows[-1]


def grad_split(model):  # (3,) on the device: this step's gradient norm in CLIP, in the adapters, in the heads
    zero = torch.zeros((), device=model.clip.logit_scale.device)
    sq = dict.fromkeys(("clip", "tsa", "xaa", "heads", "fusers"), zero)  # the squared norm of each part
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[name.split(".")[0]] = sq[name.split(".")[0]] + p.grad.float().pow(2).sum()
    return torch.stack([sq["clip"], sq["tsa"] + sq["xaa"], sq["heads"] + sq["fusers"]]).sqrt()


@torch.no_grad()
def validate(model, names, val_sets, cfg, local_batch, rank, world, device, autocast):
    """Mean validation loss per task over the same few batches every time (metrics: evaluate.py)."""
    model.eval()
    out = {}
    for i, t in enumerate(names):
        ds, losses = val_sets[t], []
        n_batches = min(cfg["eval_batches"], len(ds) // (local_batch * world) or 1)
        batches = shard_batches(len(ds), min(local_batch, len(ds) // world), rank, world, 0, i, 0)
        for keys in itertools.islice(batches, n_batches):
            batch = data.to_device(torch.utils.data.default_collate([ds[k] for k, _ in keys]), device)
            with autocast:
                losses.append(TASKS[t].loss(TASKS[t].logits(model, batch, t), batch).float())
        out[t] = rank_mean(torch.stack(losses).mean()).item()
    model.train()
    return out


def report(log_file, row):  # print a log row, append it to log.jsonl; rank 0 only (others: log_file None)
    if log_file is None:
        return
    if "val_loss" in row:
        print("val loss " + ", ".join(f"{t} {v:.4f}" for t, v in row["val_loss"].items()))
    else:
        print("step {step:>6} {task:<5} loss {loss:.4f} (task {task_loss:.4f}, kd {kd:.4f}) lr {lr:.2e} "
              "{samples_per_s:.0f} samples/s eta {eta_s:.0f} s".format(**row))
    log_file.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer, step, consumed, best, cfg, model_args, master=True):
    """Every rank calls this, the master writes: atomically (temp file + fsync + rename), never non-finite
    weights (which every rank has alike, so all stop together). Either way the previous file stays."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite weights ({bad[0]}, ...); kept the previous {path}")
    if not master:
        return
    np_state = np.random.get_state()
    # numpy's key array travels as a tensor: weights_only loading accepts tensors, not numpy arrays
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               numpy=(torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    ckpt = dict(model_args=model_args, model=model.state_dict(), optimizer=optimizer.state_dict(),
                step=step, consumed=consumed, best=best, config=cfg, rng=rng)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore(ckpt, model, optimizer):
    """Restore a run from what save_checkpoint wrote -> (step, consumed batches per task, best val loss)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    keys, *rest = ckpt["rng"]["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    return ckpt["step"], ckpt["consumed"], ckpt.get("best", math.inf)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg, given, notes = parse_config(sys.argv[1:] if argv is None else argv)
    ckpt_path, best_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "best.pt")
    resume = read_checkpoint(ckpt_path, "start the run without --resume") if cfg["resume"] else None
    if resume:  # the same run, but for what this command line sets again
        cfg = {**resume["config"], **given, "resume": True}
    init = read_checkpoint(cfg["init_from"]) if cfg["init_from"] and not resume else None
    if cfg["teachers"] and not os.path.isdir(cfg["teachers"]):
        raise FileNotFoundError(f"--teachers {cfg['teachers']}: no such directory (train the teachers first)")
    rank, world, device = setup_distributed()
    ddp, master = world > 1, rank == 0
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by {world} ranks")
    local_batch = cfg["batch_size"] // world
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    names = select(cfg["task"])
    train_sets, val_sets = open_data(cfg, names, master)

    classes = {t: ds.classes for t, ds in train_sets.items()}  # heads sized by each task's own data
    model_args = dict(  # the class names travel with the weights (sample.py)
        model=cfg["model"], pretrained=cfg["pretrained"], clip_config=cfg["clip_config"],
        tasks=model_tasks(names, classes, (cfg["cma_depth"], cfg["cma_heads"])),
        bottleneck=cfg["bottleneck"], tsa=cfg["tsa"], xaa=cfg["xaa"], fusion=cfg["fusion"],
        labels={t: ds.labels for t, ds in train_sets.items() if ds.labels})
    raw = build(model_args, pretrained=bool(cfg["pretrained"]) and not (resume or init))  # else wasted
    if init:
        raw.load_state_dict(init["model"])
    raw.to(device)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  fused=True)  # one kernel over all parameters: 4x faster than foreach on CPU
    step, consumed, best = 0, {t: 0 for t in names}, math.inf  # best: the lowest summed val loss (best.pt)
    if resume:
        step, consumed, best = restore(resume, raw, optimizer)
    step_logits = TaskLogits(raw)  # a step uses one task's adapters only: DDP must find the unused ones
    step_logits = DDP(step_logits, find_unused_parameters=True) if ddp else step_logits
    teachers = {t: load_teacher(os.path.join(cfg["teachers"], f"{t}.pt"), t, model_args).to(device)
                for t in (names if cfg["teachers"] else [])}
    probs = task_probs([len(train_sets[t]) for t in names], cfg["sampler"])
    if master:
        trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(*notes, f"resumed {ckpt_path} at step {step}" if resume else f"writing to {cfg['out_dir']}",
              describe(cfg, names),
              f"tasks {names}, sampler {cfg['sampler']}: " + ", ".join(
                  f"{t} p={p:.3f} (n={len(train_sets[t])})" for t, p in zip(names, probs.tolist())),
              f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M "
              f"trainable; global batch {cfg['batch_size']} on {world} rank(s), device {device}", sep="\n")
    streams = {}  # task -> endless batches; salt i: each task its own order, resumed where it stopped
    for i, t in enumerate(names):
        batches = shard_batches(len(train_sets[t]), local_batch, rank, world, cfg["seed"], i, consumed[t])
        streams[t] = data.stream(train_sets[t], batches, cfg["num_workers"])
    autocast = nullcontext() if device == "cpu" else torch.autocast("cuda", getattr(torch, cfg["dtype"]))
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_file = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a", buffering=1) if master else None
    last_ckpt_step = step if resume else -1  # what a NaN stop names as the last good one
    step0, t_start, t_log = step, time.time(), time.time()  # this run's first step; clocks of ETA and rate

    # every step's task, drawn on the host once (1.8 s for 90k steps): the same on every rank with no
    # communication, and checked to be so, here and at every log
    schedule = [draw_task(s, names, probs, cfg) for s in range(step, cfg["max_iters"])]
    same_on_all_ranks(torch.tensor([names.index(t) for t in schedule], device=device), "the task draws")
    window, first = torch.zeros(cfg["log_interval"], 3, device=device), step  # losses since the last check

    raw.train()
    while step < cfg["max_iters"]:
        task = schedule[step - step0]
        batch = next(streams[task])
        if cfg["modality_noise"] and TASKS[task].noisy:
            batch = swap_modality(batch, cfg["modality_noise"], cfg["seed"], step)
        if TASKS[task].prepare:  # what depends on the data's values is computed on the host
            batch = TASKS[task].prepare(batch)
        batch = data.to_device(batch, device)  # uint8 images normalised there
        consumed[task] += 1
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        with autocast:
            logits = step_logits(batch, task)  # one forward per step (under DDP, its one forward)
            task_loss = TASKS[task].loss(logits, batch)
            if task in teachers:
                kd = distill_loss(teachers[task], task, batch, logits)
            else:
                kd = torch.zeros((), device=device)
        loss = task_loss + kd  # Eq. (16)
        window[step - first] = torch.stack([loss, task_loss, kd]).detach().float()  # stays on the device
        loss.backward()
        log, done = (step + 1) % cfg["log_interval"] == 0, step + 1 == cfg["max_iters"]  # after this step
        grads = grad_split(raw) if log or done else None  # for the log: where the gradient went (no read)
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # idle tasks' parameters get no update at all
        step += 1

        if log or done or step % cfg["eval_interval"] == 0 or step % cfg["ckpt_interval"] == 0:  # the losses
            losses = settle(window[:step - first], schedule[first - step0:step - step0], first, names,
                            f"{ckpt_path} (step {last_ckpt_step})")  # are checked before any checkpoint
            first = step
        if log or done:
            rate = cfg["batch_size"] * min(cfg["log_interval"], step - step0) / (time.time() - t_log)
            eta = (time.time() - t_start) / (step - step0) * (cfg["max_iters"] - step)
            t_log = time.time()
            grads = dict(zip(("grad_backbone", "grad_adapters", "grad_heads"), grads.tolist()))
            report(log_file, dict(step=step, task=task, loss=losses[0], task_loss=losses[1], kd=losses[2],
                                  lr=optimizer.param_groups[-1]["lr"], samples_per_s=round(rate, 1),
                                  eta_s=round(eta), **grads))
        if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
            val = validate(raw, names, val_sets, cfg, local_batch, rank, world, device, autocast)
            report(log_file, dict(step=step, val_loss=val))
            if sum(val.values()) < best:  # the best checkpoint: CMA-CLIP's stages start from it
                best = sum(val.values())
                save_checkpoint(best_path, raw, optimizer, step, consumed, best, cfg, model_args, master)
        if step % cfg["ckpt_interval"] == 0:
            save_checkpoint(ckpt_path, raw, optimizer, step, consumed, best, cfg, model_args, master)
            last_ckpt_step = step
    if last_ckpt_step != step:  # the final weights, unless just saved
        save_checkpoint(ckpt_path, raw, optimizer, step, consumed, best, cfg, model_args, master)
    if master:
        print(f"done: {step} steps, checkpoint {ckpt_path}")
    if ddp:  # DDP keeps the replicas equal by construction; verify it, cheaply, on per-tensor sums
        same_on_all_ranks(torch.stack([p.detach().double().sum() for p in raw.parameters()]), "final weights")
        if master:
            print(f"final weights identical on all {world} ranks")
        dist.destroy_process_group()
    if cfg["final_eval"] and master:
        import evaluate  # metrics live in evaluate.py; the demo ends with its summary table
        evaluate.main([ckpt_path])


if __name__ == "__main__":
    cli.command_line(main)
