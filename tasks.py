"""
The task table: for each task, its mode, its head, the batch keys it reads, and two functions

    logits(model, batch, task) -> tuple of logit tensors, softmax over the last dim = the prediction
    loss(logits, batch)        -> the task loss

distill.py compares a teacher's logits with the student's, so distillation needs nothing per task.
To add a task, add one row to TASKS (and, if it needs new data, a dataset in data.py); the README
walks through an example.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import padding


# ----------------------------------------------------------------------------- negatives from all ranks
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


# ----------------------------------------------------------------------------- the four tasks
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
    return (model.heads[task](model.fuse(batch["image"], batch["text"], task)),)  # (B, classes)


def class_loss(logits, batch):  # labels of -1 (unknown at evaluation time) are ignored
    return F.cross_entropy(logits[0], batch["label"], ignore_index=-1)


def caption_mask(tokens):  # (B, L) -> (B, L - 1): target positions up to and including EOT
    return ~padding(tokens)[:, 1:]  # target j is token j + 1


def caption_logits(model, batch, task):  # Eq. (11): teacher forcing; only real targets pay the LM head
    tokens = batch["text"]
    states = model.caption_states(batch["image"], tokens[:, :-1], task)  # (B, L - 1, width)
    return (model.heads[task](states[caption_mask(tokens)]),)  # (N targets, vocab)


def caption_loss(logits, batch):  # padding ignored, EOT predicted
    tokens = batch["text"]
    return F.cross_entropy(logits[0], tokens[:, 1:][caption_mask(tokens)])


def cma_logits(model, batch, task):  # CMA-CLIP: one logit tensor per attribute
    image, text = model.encode_tokens(batch["image"], batch["text"], task)
    return model.heads[task](image, text, batch["text"])[0]


def attributes_loss(logits, batch):  # Algorithm 1, line 14: the sum over attributes; -1 = unlabelled
    # the head's attributes are the first len(logits) columns of batch["attrs"] (data.ATTRIBUTES order)
    return sum(F.cross_entropy(lg, batch["attrs"][:, i], ignore_index=-1) for i, lg in enumerate(logits))


@dataclass(frozen=True)
class Task:
    mode: str  # model.MODES: which XAA gates the task opens
    head: object  # model head spec; an attribute name ("subcategory") = a linear head over its classes
    logits: Callable
    loss: Callable
    keys: tuple  # batch keys the task reads
    data: str  # "products" (FashionGen layout) or "triplets" (FashionIQ layout)


TASKS = {
    "xmr": Task("contrastive", "norm", xmr_logits, contrastive_loss, ("image", "text"), "products"),
    "tgir": Task("fusion", "norm", tgir_logits, contrastive_loss, ("ref", "text", "target"), "triplets"),
    "scr": Task("fusion", "subcategory", fused_class_logits, class_loss, ("image", "text", "label"),
                "products"),
    "fic": Task("generative", "lm", caption_logits, caption_loss, ("image", "text"), "products"),
    # not a FAME-ViL task: CMA-CLIP's multi-attribute classifier, trained by the same loop
    "cma": Task("contrastive", "attributes", cma_logits, attributes_loss, ("image", "text", "attrs"),
                "products"),
}


FAMEVIL_TASKS = ("xmr", "tgir", "scr", "fic")  # what --task all trains


def model_tasks(names, classes, cma_size=(2, 4)):
    """{name: (mode, head)} for model.FAMEViL. `classes` = {attribute: number of classes} of the
    product data, in data.ATTRIBUTES order: a head named by an attribute becomes that many classes;
    CMA-CLIP's head takes every attribute (a prefix of data.ATTRIBUTES, see attributes_loss) with
    (depth, heads) = cma_size."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")

    def resolve(head):  # a Task's head -> model.FAMEViL's head spec
        if head == "attributes":  # CMA-CLIP: one classifier per attribute
            return ("cma", dict(classes), *cma_size)
        return classes.get(head, head)  # an attribute name -> its number of classes; "norm", "lm" as is

    return {n: (TASKS[n].mode, resolve(TASKS[n].head)) for n in names}
