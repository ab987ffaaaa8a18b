"""A new task the way the README's "Adding a task" says: one row of tasks.TASKS and its functions, on a shop's
own catalogue as it comes (image-only, its own official split, its label column named "type"), written by the
catalogue converter, with NO other edit. It trains beside xmr (each on its own data root), distils from a
teacher of its own, appears in evaluate.py's report and JSON with its chance level, and sample.py uses it. The
row is added with monkeypatch, exactly as a forker would add it to tasks.py."""
import csv
import dataclasses
import json
import os
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

import evaluate
import metrics
import catalogue
import protocols
import sample
import tasks
import train
from conftest import TINY

CLIP = json.dumps({**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 48}})
SHAPES = {"dress": "polygon", "shirt": "rectangle", "bag": "ellipse"}  # the garment type decides the drawing
COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 160, 60)}


# ---------------------------------------------------------------- the forker's code: the README's example
def garment_logits(model, batch, task):  # the image tower alone (contrastive mode), with the task's TSA
    return (model.heads[task](model.encode_image(batch["image"], task)),)  # (B, C)


def garment_loss(logits, batch):  # the label column "type", by its own name; -1 = unlabelled
    return torch.nn.functional.cross_entropy(logits[0], batch["type"], ignore_index=-1)


def garment_eval(model, task, row, val, opts):  # accuracy over the val images, beside the majority class
    pred = protocols.batches(val, lambda b, _: {"p": row.logits(model, b, task)[0].argmax(-1)}, opts, task)
    y = val.attrs[val.image_product, val.column("type")]  # (I,)
    majority = torch.full_like(y, int(y.mode().values))
    return {task: dict(protocol=f"{task}: garment type from the image alone, {len(y)} val images; "
                                f"chance = the majority class",
                       metrics={"accuracy": metrics.accuracy(y, pred["p"].cpu())},
                       chance={"accuracy": metrics.accuracy(y, majority)}, mu=["accuracy"])}


def garment_predict(model, task, ex):
    probs = model.heads[task](model.encode_image(ex["image"], task))[0].softmax(-1)
    names = ex["labels"]["type"]
    return [f"{names[i]} {p:.2f}" for p, i in zip(*probs.topk(min(3, len(names))))]


GARMENT = tasks.Task(mode="contrastive", head="type", logits=garment_logits, loss=garment_loss,
                     keys=("image", "type"), data="products", evaluate=(garment_eval,),
                     predict=garment_predict, in_all=False)


# ---------------------------------------------------------------- a shop's catalogue, as the shop would have it
def write_catalogue(d, n=60):
    """n products, 1-2 views each, a CSV with id, image (';' for two views), type, colour and the official split
    (every fifth product is in its test set); no text at all."""
    os.makedirs(d / "photos")
    rows = []
    for i in range(n):
        kind, colour = list(SHAPES)[i % 3], list(COLOURS)[(i // 3) % 3]
        views = []
        for v in range(1 + i % 2):
            im = Image.new("RGB", (40, 40), (240, 240, 235))
            box = [6 + 2 * v, 6, 34 - v, 34]
            draw = ImageDraw.Draw(im)
            if SHAPES[kind] == "polygon":
                draw.polygon([(20, 6), (34, 34), (6, 34)], fill=COLOURS[colour])
            else:
                getattr(draw, SHAPES[kind])(box, fill=COLOURS[colour])
            im.save(d / "photos" / f"p{i}_{v}.png")
            views.append(f"p{i}_{v}.png")
        rows.append(dict(id=f"sku{i}", image=";".join(views), type=kind, colour=colour,
                         split="test" if i % 5 == 4 else "train"))
    with open(d / "shop.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(d / "shop.csv"), str(d / "photos")


def run_args(data, out, *extra):
    return ["--data", data, "--out_dir", str(out), "--clip_config", CLIP, "--pretrained", "", "--context_length", "48",
            "--bottleneck", "8", "--batch_size", "8", "--lr", "1e-3", "--backbone_lr", "1e-3", "--warmup_iters", "0",
            "--num_workers", "0", "--log_interval", "1", "--eval_interval", "1000", "--eval_batches", "1", *extra]


def test_a_new_task_is_one_row_and_its_functions(toy, tmp_path, monkeypatch, capsys):
    products, images = write_catalogue(tmp_path)
    shop = str(tmp_path / "shop")
    report = catalogue.catalogue(products, images, shop, label="type", split_column="split", image_size=32)
    assert report["classes"] == 3 and report["text"] == "none (image-only)"  # dress, shirt, bag; no invented text
    assert report["products"] == {"train": 48, "val": 12} and report["split"] == {"column": "split", "train": 48,
                                                                                   "test": 12}  # the official split
    assert report["attributes"] == ["type", "colour"]  # the label keeps its own name
    monkeypatch.setitem(tasks.TASKS, "garment", GARMENT)  # the forker's one row in tasks.py
    # what the root cannot give is refused at start-up, in one line naming the task and the root
    with pytest.raises(ValueError, match=rf"task xmr reads \['text'\], which {shop}/products does not hold "
                                         rf"\(its items: .*'type'\]; it is image-only\)"):
        train.main(run_args(shop, tmp_path / "refused", "--task", "xmr,garment", "--max_iters", "1"))
    monkeypatch.setitem(tasks.TASKS, "typo", dataclasses.replace(GARMENT, head="kind", keys=("image", "kind")))
    with pytest.raises(ValueError, match=r"task typo reads \['kind'\], .*its items: \['attrs', 'class', 'colour', "
                                         r"'image', 'product', 'type'\]"):
        train.main(run_args(shop, tmp_path / "refused", "--task", "typo", "--max_iters", "1"))

    # teachers: one single-task run per task, each on its own data
    teachers = tmp_path / "teachers"
    train.main(run_args(toy, tmp_path / "t_xmr", "--task", "xmr", "--max_iters", "2"))
    train.main(run_args(shop, tmp_path / "t_garment", "--task", "garment", "--max_iters", "4"))
    os.makedirs(teachers)
    for t in ("xmr", "garment"):
        shutil.copy(tmp_path / f"t_{t}" / "ckpt.pt", teachers / f"{t}.pt")

    # the student: the new task beside xmr, each reading its own root, distilled from both teachers
    student = tmp_path / "student"
    train.main(run_args(f"{toy},garment={shop}", student, "--task", "xmr,garment", "--teachers", str(teachers),
                        "--sampler", "round_robin", "--max_iters", "6"))
    log = [json.loads(line) for line in open(student / "log.jsonl") if '"task"' in line]
    assert [r["task"] for r in log] == ["xmr", "garment"] * 3
    assert all(r["kd"] > 0 for r in log)  # distilled from its own teacher on every garment step
    ckpt = torch.load(student / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["tasks"]["garment"] == ("contrastive", 3)
    assert ckpt["model_args"]["labels"]["garment"]["type"] == ["bag", "dress", "shirt"]

    # evaluate.py runs it through its row: printed with its chance level, in the JSON and in the summary
    capsys.readouterr()
    r = evaluate.main([str(student / "ckpt.pt"), "--json", str(tmp_path / "r.json"), "--workers", "0"])
    printed = capsys.readouterr().out
    assert r["garment"]["protocol"].startswith("garment: garment type from the image alone")
    assert r["garment"]["protocol"] in printed
    after = printed.split(r["garment"]["protocol"])[1].splitlines()[1]  # the line under the protocol
    assert after.split()[:2] == ["accuracy", f"{r['garment']['metrics']['accuracy']:.2f}"]
    assert after.split("chance")[1].strip() == f"{r['garment']['chance']['accuracy']:.2f}"
    saved = json.load(open(tmp_path / "r.json"))
    assert saved["garment"]["metrics"]["accuracy"] == r["garment"]["metrics"]["accuracy"]
    assert set(saved["summary"]["mu"]) == {"xmr", "garment"}
    assert saved["summary"]["mu"]["garment"]["chance"] == r["garment"]["chance"]["accuracy"]

    # sample.py predicts with it
    image = os.path.join(images, "p1_0.png")
    lines = sample.main([str(student / "ckpt.pt"), image, "--task", "garment"])
    assert len(lines) == 3 and {line.split()[0] for line in lines} == {"bag", "dress", "shirt"}
