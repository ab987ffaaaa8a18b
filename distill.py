"""
Multi-teacher distillation (Sec. 3.2, Eq. 12-16): frozen single-task teachers guide the student.

Only the sampled task's teacher runs, under no_grad. Each task's `logits` function (tasks.py) runs
on the teacher exactly as on the student, so teacher similarities use teacher features on both
sides (the authors' code, github.com/BrandonHanx/FAME-ViL, mixes student features in there: a bug
we do not copy). The loss is KL(teacher || student) of the softmax over the last dimension, at
temperature 1:
    XMR   both directions of the similarity matrix      Eq. (12)
    TGIR  query -> target rows                          Eq. (13)
    SCR   class probabilities                           Eq. (14)
    FIC   vocabulary distribution at every target token Eq. (15)
The paper writes KL(s || s~) with s the student's; we minimise KL(teacher || student), the direction
of the authors' code (a cross-entropy against the teacher's soft labels, up to a constant).
"""
import os

import torch
import torch.nn.functional as F

from model import MODES, from_checkpoint, read_checkpoint
from tasks import TASKS


def load_teacher(path, task, student_args):
    """A frozen single-task teacher from a train.py checkpoint. It must have been trained on `task` with
    every architecture choice that changes its outputs equal to the student's (backbone, bottleneck,
    TSA, the task's mode and head; the XAA if the task's mode opens a gate; the fusion if it fuses),
    else a ValueError lists every mismatch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher for task {task!r}: no checkpoint at {path} "
                                f"(train it first: python train.py --task {task} --out_dir DIR, then copy "
                                f"DIR/ckpt.pt to {path})")
    ckpt = read_checkpoint(path)
    args, problems = ckpt["model_args"], []
    mode = student_args["tasks"][task][0]
    if task not in args["tasks"]:
        problems.append(f"it was trained for {sorted(args['tasks'])}, not {task!r}")
    elif tuple(args["tasks"][task]) != tuple(student_args["tasks"][task]):
        problems.append(f"its (mode, head) is {tuple(args['tasks'][task])}, the student's "
                        f"{tuple(student_args['tasks'][task])}")
    keys = ["model", "clip_config", "bottleneck", "tsa"]
    if any(MODES[mode].values()):  # the task reads the other tower: the XAAs shape its outputs
        keys.append("xaa")
    if mode == "fusion":  # the fused feature: a sum or a modality-wise attention
        keys.append("fusion")
    for key in keys:
        if args.get(key) != student_args.get(key):
            problems.append(f"{key} is {args.get(key)!r}, the student's {student_args.get(key)!r}")
    if problems:
        raise ValueError(f"teacher {path} does not fit task {task!r}: " + "; ".join(problems))
    return from_checkpoint(ckpt).eval().requires_grad_(False)


def kl(teacher_logits, student_logits):  # KL(p_teacher || p_student), mean over rows
    return F.kl_div(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                    log_target=True, reduction="batchmean")


def distill_loss(teacher, task, batch, student_logits):
    """Eq. (12-15): the KL terms of one task, averaged over its logit tensors (XMR has two)."""
    with torch.no_grad():
        teacher_logits = TASKS[task].logits(teacher, batch, task)
    return sum(kl(t, s) for t, s in zip(teacher_logits, student_logits)) / len(student_logits)
