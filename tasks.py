"""
The task table: everything that differs between tasks, one row each. Nothing else in the code lists the
paper's tasks or dispatches on a task's name: to add a task, add a row and its functions (README, "Adding
a task").

A row (Task):
    mode      which XAA gates it opens (model.MODES): contrastive, fusion or generative
    head      "norm" (retrieval: s x / |x|), "lm" (captioning), the name of a label attribute of its data
              (a linear classifier over that attribute's classes; "class": the data's class attribute,
              chosen when it was prepared), or "attributes" (CMA-CLIP: one classifier per attribute)
    logits    logits(model, batch, task) -> tuple of logit tensors; softmax over the last dim = the
              prediction. distill.py compares a teacher's with the student's, so distillation needs
              nothing per task
    loss      loss(logits, batch) -> the task loss
    keys      the batch keys it reads
    data      the prepared layout it reads (data.LAYOUTS: "products", "triplets")
    evaluate  its evaluation protocols (protocols.py), run by evaluate.py on the validation split
    predict   predict(model, task, example) -> lines of text: what sample.py prints for one image
    prepare   prepare(batch) -> batch, on the host before it moves to the device: what depends on the data's
              values (FIC: where its real targets are), so that a training step never waits for the device
    paper     the paper's figures for its results, printed beside ours for full-size runs
    noisy     CMA-CLIP's noisy-modality training applies (train.py --modality_noise: data.swap_modality)
    in_all    trained by --task all (FAME-ViL's four tasks)

    python tasks.py [--model ViT-B-16-quickgelu] [--bottleneck 64] [--json]
prints the table and the parameters of the model it builds (Table 4's #Params) at FashionGen's class counts,
downloading nothing.
"""
import argparse
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import protocols
from data import seed_of
from model import CLIP_MODEL, MODES, FAMEViL, build_clip, padding


# ----------------------------------------------------------------------------- across ranks: negatives, means
def _world():  # (rank, world size); (0, 1) outside torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that keeps the gradient. Every rank's loss uses this rank's features as negatives,
    so the backward sums the incoming gradients over ranks and returns this rank's slice; DDP then
    averages, which gives exactly the gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(_world()[1])]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank, world = _world()
        return grad.chunk(world)[rank]


def gather(x):  # (B, D) -> (world * B, D), rank r's rows at [r * B, (r + 1) * B)
    return _GatherWithGrad.apply(x) if _world()[1] > 1 else x


def _targets(logits):  # the positive of local query i is global column rank * B + i
    B = logits.shape[0]
    return torch.arange(B, device=logits.device) + _world()[0] * B


def rank_mean(x):  # the mean of x over the ranks (x itself in one process)
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def same_on_all_ranks(x, what):  # x: a tensor every rank must hold exactly; guards the training loop in DDP
    if dist.is_initialized():
        lo, hi = x.clone(), x.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differ between ranks (this rank's: {x.tolist()})")


# ----------------------------------------------------------------------------- logits and losses
def xmr_logits(model, batch, task):  # Eq. (7-8): s(I, T) = s^2 cos, both directions
    head = model.heads[task]
    image = head(model.encode_image(batch["image"], task))  # (B, E), norm s
    text = head(model.encode_text(batch["text"], task))  # (B, E)
    return image @ gather(text).T, text @ gather(image).T  # (B, world * B) each


def tgir_logits(model, batch, task):  # Eq. (10): fused (reference, text) query vs contrastive target
    head = model.heads[task]
    query = head(model.fuse(batch["ref"], batch["text"], task))  # (B, E)
    target = head(model.encode_image(batch["target"], task))  # (B, E)
    return (query @ gather(target).T,)  # (B, world * B)


def contrastive_loss(logits, batch):  # InfoNCE, Eq. (8), averaged over the directions given (Eq. 7)
    return sum(F.cross_entropy(lg, _targets(lg)) for lg in logits) / len(logits)


def fused_class_logits(model, batch, task):  # Eq. (9): a classifier on the fused feature
    return (model.heads[task](model.fuse(batch["image"], batch["text"], task)),)  # (B, C)


def class_loss(logits, batch):  # labels of -1 (a class unknown to the label map) are ignored
    return F.cross_entropy(logits[0], batch["class"], ignore_index=-1)


def caption_mask(tokens):  # (B, L) -> (B, L - 1): target positions up to and including EOT
    return ~padding(tokens)[:, 1:]  # target j is token j + 1


def caption_targets(batch):
    """(N,) the positions of a batch's real caption targets in (B * (L - 1)): the row's `prepare` computes
    them on the host (train.py), where the tokens are; else here, where a GPU would have to say how many."""
    return batch["targets"] if "targets" in batch else caption_mask(batch["text"]).flatten().nonzero()[:, 0]


def caption_logits(model, batch, task):  # Eq. (11): teacher forcing; only real targets pay the LM head
    tokens = batch["text"]
    states = model.caption_states(batch["image"], tokens[:, :-1], task)  # (B, L - 1, Dt)
    return (model.heads[task](states.flatten(0, 1)[caption_targets(batch)]),)  # (N targets, V)


def caption_loss(logits, batch):  # padding ignored, EOT predicted
    return F.cross_entropy(logits[0], batch["text"][:, 1:].flatten()[caption_targets(batch)])


def cma_logits(model, batch, task):  # CMA-CLIP: one logit tensor per attribute of the data
    image, text = model.encode_tokens(batch["image"], batch["text"], task)
    return model.heads[task](image, text, batch["text"])


def attributes_loss(logits, batch):  # Algorithm 1, line 14: the sum over attributes; -1 = unlabelled
    # one logit tensor per column of batch["attrs"], in the data's attribute order
    return sum(F.cross_entropy(lg, batch["attrs"][:, i], ignore_index=-1) for i, lg in enumerate(logits))


# ----------------------------------------------------------------------------- CMA-CLIP's noisy modality
def swap_modality(batch, fraction, seed, step):  # train.py applies it to the rows marked noisy
    """CMA-CLIP's noisy modality: `fraction` of the samples get another sample's text (half of them)
    or image (the other half); labels stay. A pure function of (seed, step), like every draw."""
    g = torch.Generator().manual_seed(seed_of(seed, "noise", step))
    B = len(batch["text"])
    u = torch.rand(B, generator=g)
    other = (torch.arange(B) + torch.randint(1, B, (B,), generator=g)) % B  # never the sample itself
    text, image = u < fraction / 2, (u >= fraction / 2) & (u < fraction)
    return dict(batch, text=torch.where(text[:, None], batch["text"][other], batch["text"]),
                image=torch.where(image[:, None, None, None], batch["image"][other], batch["image"]))


# ----------------------------------------------------------------------------- one example (sample.py)
# An example: image (1, 3, S, S); text (N, L) token ids of the --text values or None, and their strings
# in `texts`; gallery (paths, images (G, 3, S, S)) or None; labels {attribute: class names}; beam.
def _ranked(scores, names, k=5):  # "0.812  name" lines, best first
    top = scores.topk(min(k, len(names)))
    return [f"  {s:.3f}  {names[i]}" for s, i in zip(top.values.tolist(), top.indices.tolist())]


def _needs(example, task, *what):  # a missing input is the user's error: it names the flag
    missing = [w for w in what if example[w] is None]
    if missing:
        raise ValueError(f"--task {task} needs --{' and --'.join(missing)}")


def retrieve_predict(model, task, ex):  # rank the gallery for the text (or the image), or the texts
    if ex["gallery"] is None and ex["text"] is None:
        raise ValueError(f"--task {task} needs --text (texts to rank for the image) or --gallery (images)")
    image = F.normalize(model.encode_image(ex["image"], task), dim=-1)  # (1, E)
    texts = None if ex["text"] is None else F.normalize(model.encode_text(ex["text"], task), dim=-1)
    if ex["gallery"] is None:  # zero-shot style: which text fits the image
        scores = (image @ texts.T)[0]  # (N,)
        return ["texts by cosine with the image:"] + _ranked(scores, ex["texts"], len(ex["texts"]))
    paths, images = ex["gallery"]
    gallery = F.normalize(model.encode_image(images, task), dim=-1)  # (G, E)
    query, what = (image, "the image") if texts is None else (texts[:1], repr(ex["texts"][0]))
    return [f"gallery images by cosine with {what}:"] + _ranked((query @ gallery.T)[0], paths)


def composed_predict(model, task, ex):  # rank the gallery for the image modified by the text
    _needs(ex, task, "text", "gallery")
    paths, images = ex["gallery"]
    query = F.normalize(model.fuse(ex["image"], ex["text"][:1], task), dim=-1)  # (1, E)
    gallery = F.normalize(model.encode_image(images, task), dim=-1)  # (G, E)
    return [f"gallery images for the image + {ex['texts'][0]!r}:"] + _ranked((query @ gallery.T)[0], paths)


def classify_predict(model, task, ex):  # the top classes of each of the task's attributes
    _needs(ex, task, "text")
    row = TASKS[task]
    logits = row.logits(model, {"image": ex["image"], "text": ex["text"][:1]}, task)
    names = attributes(ex["labels"]) if row.head == "attributes" else [row.head]
    lines = []
    for attribute, lg in zip(names, logits):
        lines += [f"{attribute}:"] + _ranked(lg[0].softmax(-1), ex["labels"][attribute], 3)
    return lines


def caption_predict(model, task, ex):
    return ["caption: " + protocols.decode(model.generate(ex["image"], task, model.context_length - 1,
                                                          ex["beam"])[0])]


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True, kw_only=True)
class Task:  # a row: the fields are documented at the top of this file
    mode: str
    head: object
    logits: Callable
    loss: Callable
    keys: tuple
    data: str
    evaluate: tuple = ()
    predict: Callable = None
    prepare: Callable = None
    paper: dict = field(default_factory=dict)
    noisy: bool = False
    in_all: bool = True


RECALL = protocols.RECALL_KEYS  # I->T R@1, R@5, R@10, T->I R@1, R@5, R@10
TASKS = {
    "xmr": Task(mode="contrastive", head="norm", logits=xmr_logits, loss=contrastive_loss,
                keys=("image", "text"), data="products", evaluate=(protocols.retrieval, protocols.zero_shot),
                predict=retrieve_predict,
                # Table 1 (random-100); the supplement's Table 2 (the full protocol, mean of 3 seeds)
                paper={"xmr_random100": dict(zip(RECALL, (65.94, 91.92, 97.22, 62.86, 87.38, 93.52))),
                       "xmr_full": dict(zip(RECALL, (45.99, 73.25, 81.84, 53.12, 77.55, 86.02)))}),
    "tgir": Task(mode="fusion", head="norm", logits=tgir_logits, loss=contrastive_loss,
                 keys=("ref", "text", "target"), data="triplets", evaluate=(protocols.composed_retrieval,),
                 predict=composed_predict,
                 paper={"tgir": {"dress R@10": 42.19, "dress R@50": 67.38, "shirt R@10": 47.64,  # Table 2
                                 "shirt R@50": 68.79, "toptee R@10": 50.69, "toptee R@50": 73.07}}),
    "scr": Task(mode="fusion", head="class", logits=fused_class_logits, loss=class_loss,
                keys=("image", "text", "class"), data="products", evaluate=(protocols.classification,),
                predict=classify_predict, noisy=True,
                paper={"scr": {"accuracy": 94.67, "macro-F1": 88.21}}),  # Table 3
    "fic": Task(mode="generative", head="lm", logits=caption_logits, loss=caption_loss,
                keys=("image", "text"), data="products", evaluate=(protocols.captioning,),
                predict=caption_predict, prepare=lambda batch: dict(batch, targets=caption_targets(batch)),
                paper={"fic": {"BLEU-4": 30.73, "METEOR": 25.04, "ROUGE-L": 55.83,  # Table 3
                               "CIDEr": 150.4}}),
    # not a FAME-ViL task: CMA-CLIP's multi-attribute classifier, trained by the same loop
    "cma": Task(mode="contrastive", head="attributes", logits=cma_logits, loss=attributes_loss,
                keys=("image", "text", "attrs"), data="products", evaluate=(protocols.classification,),
                predict=classify_predict, noisy=True, in_all=False),
}
ALL = [name for name, row in TASKS.items() if row.in_all]  # what --task all trains
# FashionGen's label counts in its training split ("class": its class attribute, the sub-category): the
# classifier heads' sizes where no data is at hand (python tasks.py, bench.py). A task whose head classifies
# another attribute adds its count here.
FASHIONGEN_CLASSES = {"class": 121, "subcategory": 121, "category": 48}


def attributes(per_attribute):  # the attributes of a dataset's {attribute: ...}, without the "class" alias
    return [a for a in per_attribute if a != "class"]


def table4_row(names, cfg):
    """The row of the paper's Table 4 that a run of train.py (its config cfg) reproduces, or None: FAME-ViL's
    tasks, the paper's fusion and no CMA-CLIP noise or stage; rows 1-11 at any adapter width (a miniature),
    16-18 at their own."""
    arch = {(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[cfg["tsa"], cfg["xaa"]]
    if cfg["fusion"] != "add" or cfg["cma_stage"] or cfg["modality_noise"]:
        return None
    if len(names) == 1:  # group I: single-task learning
        return (4, 2, 3, 1)[arch] if names[0] in ALL else None
    if cfg["teachers"]:  # groups III and IV: distilled, FAME-ViL's architecture
        if arch or names != ALL:
            return None
        if cfg["bottleneck"] in (128, 256, 512):  # wider adapters, size-proportional sampling
            return {128: 16, 256: 17, 512: 18}[cfg["bottleneck"]] if cfg["sampler"] == "size" else None
        return {"size": 9, "uniform": 10, "round_robin": 11}[cfg["sampler"]]
    # group II: multi-task learning without distillation; without XAAs nothing captions
    full = names == ALL or (not cfg["xaa"] and names == [t for t in ALL if TASKS[t].mode != "generative"])
    return (8, 6, 7, 5)[arch] if full and cfg["sampler"] == "size" else None


def describe(cfg, names):  # train.py's start-up line: what runs, in the paper's terms
    if len(names) == 1:
        what = f"single-task run of {names[0]} (a teacher for distillation)"
    elif cfg["teachers"]:
        what = f"multi-task run of {names}, distilled from the single-task teachers in {cfg['teachers']}"
    else:
        what = f"multi-task run of {names} without distillation (base MTL: no --teachers)"
    row = table4_row(names, cfg)
    return what + (f"; Table 4 row {row}" if row else "")


def select(spec):
    """'all' or a comma list of task names -> the list of names; an unknown name is an error."""
    names = ALL if spec == "all" else [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown}; known: all, {', '.join(TASKS)}")
    return names


def model_tasks(names, classes, cma_size=(2, 4)):
    """{name: (mode, head spec)} for model.FAMEViL. classes[task] = {attribute: number of classes} of the
    task's data: a head named by an attribute becomes a linear layer over that many classes; "attributes"
    becomes CMA-CLIP's head over all of them, with (depth, heads) = cma_size."""
    def spec(name):
        head = TASKS[name].head
        if head == "attributes":
            return ("cma", {a: classes[name][a] for a in attributes(classes[name])}, *cma_size)
        if head in ("norm", "lm"):
            return head
        if head not in classes.get(name, {}):
            raise ValueError(f"task {name!r} classifies {head!r}, which its data does not label "
                             f"(its labels: {sorted(classes.get(name, {}))})")
        return classes[name][head]

    return {name: (TASKS[name].mode, spec(name)) for name in select(",".join(names))}


def param_table(model):
    """Parameter counts: backbone, one TSA set, XAAs, heads, student total, and the saving against
    one single-task model per task (each = CLIP + its TSA + the XAAs its mode needs + its head)."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    clip = count(model.clip)
    tsa = {t: sum(count(model.tsa[tower][t]) for tower in model.tsa) for t in model.tasks}
    xaa = {tower: count(m) for tower, m in model.xaa.items()}
    # a task's modality-wise attention (fusion="modality") counts as part of its head
    heads = {t: count(h) + (count(model.fusers[t]) if t in model.fusers else 0)
             for t, h in model.heads.items()}
    single = {}
    for t, (mode, _) in model.tasks.items():
        needs = [tower for tower, reads in MODES[mode].items() if reads and tower in xaa]
        single[t] = clip + tsa[t] + sum(xaa[tower] for tower in needs) + heads[t]
    total = count(model)
    return dict(clip=clip, tsa_per_task=next(iter(tsa.values()), 0), tsa=tsa, xaa=sum(xaa.values()),
                xaa_per_tower=xaa, heads=heads, total=total, single_task=single,
                single_task_total=sum(single.values()), saving=1 - total / sum(single.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=CLIP_MODEL, help="an open_clip model name, built with random weights")
    p.add_argument("--bottleneck", type=int, default=64, help="the adapters' bottleneck (Table 4 group IV)")
    p.add_argument("--json", action="store_true", help="print the parameter counts alone, as JSON")
    args = p.parse_args(argv)
    classes = {name: FASHIONGEN_CLASSES for name in ALL}
    model = FAMEViL(build_clip(args.model, pretrained=None), model_tasks(ALL, classes), args.bottleneck)
    t = param_table(model)
    if args.json:
        print(json.dumps(t))
        return t
    print("task   mode         head         data       protocols")
    for name, row in TASKS.items():
        protocol_names = ", ".join(f.__name__ for f in row.evaluate)
        print(f"{name:<6} {row.mode:<12} {str(row.head):<12} {row.data:<10} {protocol_names}")

    def pct(n):  # share of the CLIP backbone
        return f"{100 * n / t['clip']:8.2f} %"

    print(f"\nFAME-ViL parameters: {args.model}, bottleneck {args.bottleneck}, tasks {ALL}")
    print(f"  CLIP backbone          {t['clip']:>13,} {pct(t['clip'])}")
    print(f"  TSA, one task          {t['tsa_per_task']:>13,} {pct(t['tsa_per_task'])}")
    for tower, n in t["xaa_per_tower"].items():
        print(f"  XAA, {tower:<6} tower      {n:>13,} {pct(n)}")
    print(f"  XAA, all               {t['xaa']:>13,} {pct(t['xaa'])}")
    for task, n in t["heads"].items():
        print(f"  head {task:<6}            {n:>13,} {pct(n)}")
    print(f"  student total          {t['total']:>13,} {pct(t['total'])}")
    for task, n in t["single_task"].items():
        print(f"  single-task {task:<6}     {n:>13,}")
    print(f"  single-task total      {t['single_task_total']:>13,}")
    print(f"  saving                 {100 * t['saving']:>12.2f} %  (paper, Table 4 row 9: 67.33 %)")
    return t


if __name__ == "__main__":
    import cli
    cli.command_line(main)
