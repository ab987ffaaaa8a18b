"""Failure handling: killed runs, torn checkpoint writes, unsafe checkpoints, and a table of bad inputs,
each of which must raise a precise error naming its culprit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model
import prepare
import train
from test_train import ROOT, args, weights


def run_train(*argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(toy, tmp_path):
    # all three runs in subprocesses with the same thread count: bitwise equality needs the same kernels
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(*args(toy, straight, "--max_iters", "16")).wait() == 0
    p = run_train(*args(toy, killed, "--max_iters", "16"))
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # kill it once it is past its step-8 checkpoint
        if log.exists() and any(json.loads(line).get("step", 0) >= 10 for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before we could kill it"
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert 8 <= step < 16
    assert run_train(*args(toy, killed, "--max_iters", "16", "--resume", "true")).wait() == 0
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_write_keeps_previous(toy, tmp_path):
    train.main(args(toy, tmp_path, "--max_iters", "2"))
    before = weights(tmp_path)
    # a process that dies half-way through writing the next checkpoint
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {ROOT!r})
import train
save = torch.save
def torn(obj, f):
    if "ckpt.pt" not in f.name:  # best.pt is written first; tear the write of ckpt.pt
        return save(obj, f)
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn
train.main({args(toy, tmp_path, "--max_iters", "4", "--resume", "true")!r})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    assert any(n.startswith("ckpt.pt.tmp") for n in os.listdir(tmp_path))  # the torn write is there ...
    after = weights(tmp_path)  # ... but ckpt.pt is still the previous, loadable checkpoint
    assert all(torch.equal(before[k], after[k]) for k in before)


class Payload:  # not a tensor, dict or number: loading it would mean running arbitrary unpickling code
    pass


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "ckpt.pt")
    with pytest.raises(RuntimeError, match=r"cannot load checkpoint .*ckpt\.pt safely \(weights_only=True\)"):
        model.read_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(RuntimeError, match=r"weights_only=True"):
        train.main(["--out_dir", str(tmp_path), "--resume", "true"])


# ---------------------------------------------------------------------------- the bad-input table
def delete_images(root):  # the validation images of the products, as arrays for the tests' 32 px CLIP
    os.remove(os.path.join(root, "products", "images.val.37.u8"))


def torn_images(root):  # a write that stopped half-way
    path = os.path.join(root, "products", "images.val.37.u8")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)


def truncate_jsonl(root):
    path = os.path.join(root, "products", "products.train.jsonl")
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])


def empty_products(root):
    open(os.path.join(root, "products", "products.train.jsonl"), "w").close()


def empty_captions(root):
    path = os.path.join(root, "triplets", "triplets.tops.train.jsonl")
    rows = data.read(path)
    rows[0]["captions"] = []
    open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))


def few_triplets(root):  # a sampled task whose dataset is smaller than one batch (its arrays written anew)
    for p in os.listdir(os.path.join(root, "triplets")):
        if p.startswith("triplets.") and p.endswith(".train.jsonl"):
            rows = data.read(os.path.join(root, "triplets", p))[:1]
            open(os.path.join(root, "triplets", p), "w").write("".join(json.dumps(r) + "\n" for r in rows))
    prepare.triplet_arrays(os.path.join(root, "triplets"), 32, ", ")


def wrong_teacher(root, out):  # an SCR checkpoint handed over as the XMR teacher
    train.main(args(root, out / "scr", "--task", "scr", "--max_iters", "1"))
    os.makedirs(out / "teachers")
    shutil.copy(out / "scr" / "ckpt.pt", out / "teachers" / "xmr.pt")
    return ["--task", "xmr", "--teachers", str(out / "teachers")]


BAD = [  # (name, break the data, extra train args, error class, message): train.py meets it at start
    ("missing images", delete_images, None, FileNotFoundError,
     r"images\.val\.37\.u8 not found: the val images of .*products at 37 px, for a 32 px model: write them with "
     r"python prepare\.py upgrade .* --image_size 32"),
    ("torn images", torn_images, None, ValueError,
     r"images\.val\.37\.u8 holds \d+ images where its records list \d+: the val images of"),
    ("truncated JSONL", truncate_jsonl, None, ValueError, r"products\.train\.jsonl:\d+: malformed JSON"),
    ("empty caption", empty_captions, None, ValueError, r"triplets\.tops\.train\.jsonl:1: no captions"),
    ("empty dataset", empty_products, None, ValueError, r"products\.train\.jsonl: no products"),
    ("too few for a batch", few_triplets, None, ValueError, r"task tgir: 6 training samples"),
    ("unknown task", None, ["--task", "xmr,captioning"], ValueError, r"unknown task\(s\) \['captioning'\]"),
    ("wrong open_clip name", None, ["--model", "ViT-B-61", "--clip_config", "{}"], ValueError,
     r"unknown open_clip model 'ViT-B-61'"),
    ("missing teachers", None, ["--task", "scr", "--teachers", "/nonexistent"], FileNotFoundError,
     r"--teachers /nonexistent: no such directory"),
    ("missing teacher", lambda root: os.makedirs(os.path.join(root, "teachers")), ["--task", "scr", "--teachers",
     "{root}/teachers"], FileNotFoundError, r"teacher for task 'scr': no checkpoint at .*teachers/scr\.pt"),
    ("teacher of the wrong task", wrong_teacher, None, ValueError,
     r"teacher .*xmr\.pt does not fit task 'xmr': it was trained for \['scr'\]"),
]


@pytest.mark.parametrize("name,breaks,extra,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(toy, tmp_path, name, breaks, extra, error, message):
    root = str(tmp_path / "data")
    shutil.copytree(toy, root)
    if breaks is wrong_teacher:
        extra = breaks(root, tmp_path)
    elif breaks:
        breaks(root)
    extra = [e.replace("{root}", root) for e in extra or []]
    with pytest.raises(error, match=message):
        train.main(args(root, tmp_path / "out", "--max_iters", "2", *extra))


def test_best_travels_in_the_checkpoint(toy, tmp_path, monkeypatch):
    # a resumed run knows the best validation loss so far: a worse one after the resume must not replace best.pt
    losses = iter([{"xmr": 1.0}, {"xmr": 2.0}])
    monkeypatch.setattr(train, "validate", lambda *a, **k: next(losses))
    run = args(toy, tmp_path, "--task", "xmr", "--eval_interval", "2", "--ckpt_interval", "2")
    train.main(run + ["--max_iters", "2"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["best"] == 1.0
    train.main(run + ["--max_iters", "4", "--resume", "true"])
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 2  # step 4's 2.0 is worse
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["best"] == 1.0


@pytest.mark.slow
def test_non_finite_weights_stop_every_rank_with_one_message(toy, tmp_path):
    # the third optimizer step leaves a NaN weight on both ranks (DDP keeps them equal); the step-3 checkpoint
    # refuses it on every rank, so no rank waits forever at the next collective. Each rank writes what it raised.
    script = tmp_path / "poisoned.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
import train
step = torch.optim.AdamW.step
def poisoned(self, *a, **k):
    step(self, *a, **k)
    poisoned.calls += 1
    if poisoned.calls == 3:
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
poisoned.calls = 0
torch.optim.AdamW.step = poisoned
try:
    train.main(sys.argv[1:])
except FloatingPointError as e:
    open({str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.txt", "w").write(str(e))
    raise
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           *args(toy, tmp_path / "run", "--task", "xmr", "--max_iters", "6", "--ckpt_interval", "3")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    messages = [(tmp_path / f"rank{k}.txt").read_text() for k in (0, 1)]
    assert messages[0] == messages[1] and messages[0].startswith("step 3: non-finite weights")
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")  # nothing non-finite was written
