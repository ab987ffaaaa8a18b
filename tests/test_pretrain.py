"""pretrain.py: the toy's CLIP pretrained with CLIP's own objective on a corpus disjoint from ToyFashion, written
as an open_clip checkpoint that train.py --pretrained FILE loads through open_clip's load_checkpoint; cached and
exactly resumable."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

import data
import evaluate
import model
import pretrain
import toy as toy_module
import train
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained(toy, tmp_path_factory):  # (out_dir, toy_clip.pt, the zero-shot report): one --quick call
    out = tmp_path_factory.mktemp("pretrain")
    final, report = pretrain.main(["--quick", "--out_dir", str(out), "--corpus", str(out / "corpus"), "--toy", toy])
    return out, final, report


def test_the_checkpoint_loads_through_pretrained_and_fresh_adapters_leave_clip_unchanged(pretrained, toy, tmp_path):
    out, final, _ = pretrained
    clip = open_clip.CLIP(**TINY).eval()
    clip.load_state_dict(torch.load(final, weights_only=True)["state_dict"])  # the pretraining's own model
    flags = ["--task", "all", "--max_iters", "0", "--final_eval", "false", "--data", toy, "--out_dir", str(tmp_path),
             "--clip_config", json.dumps(TINY), "--context_length", "32", "--pretrained", final, "--num_workers", "0"]
    train.main(flags)  # train.py's path: model.build_clip -> open_clip.load_checkpoint
    m = model.from_checkpoint(model.read_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    images = torch.randn(3, 3, 32, 32)
    text = open_clip.tokenize(["red striped shirt", "a bag", "navy midi dress with dots"], context_length=32)
    with torch.no_grad():
        for task in m.tasks:  # every task's (zero-initialised) TSA adds exactly 0
            assert torch.equal(m.encode_image(images, task), clip.encode_image(images)), task
            assert torch.equal(m.encode_text(text, task), clip.encode_text(text)), task
    assert not torch.equal(m.clip.visual.conv1.weight, open_clip.CLIP(**TINY).visual.conv1.weight)


def test_a_missing_pretrained_file_is_one_line_and_exit_2(toy, tmp_path):
    cmd = [sys.executable, "train.py", "--data", toy, "--out_dir", str(tmp_path), "--clip_config", json.dumps(TINY),
           "--context_length", "32", "--max_iters", "0", "--pretrained", str(tmp_path / "nowhere.pt")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "nowhere.pt" in r.stderr and "pretrain.py" in r.stderr


def test_zero_shot_and_retrieval_are_reported_from_the_pretrained_clip(pretrained):
    out, final, report = pretrained
    saved = json.load(open(out / "zero_shot.json"))
    assert saved["summary"] == report["summary"]
    assert {"xmr_full", "xmr_random100", "xmr_zeroshot"} <= set(saved)
    step0 = model.read_checkpoint(str(out / "step0" / "ckpt.pt"))
    assert step0["step"] == 0 and step0["model_args"]["pretrained"] == final


def test_a_second_call_reuses_the_checkpoint(pretrained, toy, monkeypatch):
    out, final, _ = pretrained
    stamp = os.path.getmtime(final)
    monkeypatch.setattr(pretrain, "zero_shot_report", lambda *a: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: pytest.fail("trained again"))
    assert pretrain.main(["--quick", "--out_dir", str(out), "--corpus", str(out / "corpus"), "--toy", toy])[0] == final
    assert os.path.getmtime(final) == stamp


def test_a_second_call_reuses_the_zero_shot_report(pretrained, toy, monkeypatch):
    out, final, report = pretrained
    monkeypatch.setattr(evaluate, "main", lambda *a: pytest.fail("evaluated again"))
    again = pretrain.main(["--quick", "--out_dir", str(out), "--corpus", str(out / "corpus"), "--toy", toy])
    assert again == (final, json.loads(json.dumps(report)))  # the JSON evaluate.py wrote on the first call
    # a report older than the checkpoint is not of it: evaluated again
    stamp = os.path.getmtime(final)
    os.utime(out / "zero_shot.json", (stamp - 60, stamp - 60))
    monkeypatch.setattr(evaluate, "main", lambda argv: {"evaluated": argv[0]})
    assert pretrain.main(["--quick", "--out_dir", str(out), "--corpus", str(out / "corpus"), "--toy", toy])[1] == {
        "evaluated": str(out / "step0" / "ckpt.pt")}
    os.utime(out / "zero_shot.json")  # the shared report current again, for the other tests


def test_a_killed_pretraining_resumes_exactly(pretrained, toy, tmp_path, monkeypatch):
    corpus = str(pretrained[0] / "corpus")
    monkeypatch.setattr(pretrain, "zero_shot_report", lambda *a: None)
    flags = ["--quick", "--corpus", corpus, "--toy", toy, "--ckpt_interval", "8"]
    straight = pretrain.main(flags + ["--out_dir", str(tmp_path / "a")])[0]
    save = pretrain.save

    def save_then_die(path, obj):  # killed right after its first checkpoint, at step 8 of 20
        save(path, obj)
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(flags + ["--out_dir", str(tmp_path / "b")])
    monkeypatch.setattr(pretrain, "save", save)
    resumed = pretrain.main(flags + ["--out_dir", str(tmp_path / "b")])[0]
    a, b = (torch.load(f, weights_only=True)["state_dict"] for f in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")] == [5, 10, 15, 20]


def test_the_corpus_shares_no_text_and_no_image_with_toyfashion(pretrained, toy):
    corpus = str(pretrained[0] / "corpus")
    texts, pixels = {}, {}
    for root in (corpus, toy):
        sets = [data.open_dataset("products", root, split, 32, 32, False, {"aug": "crop"}) for split in ("train", "val")]
        texts[root] = {t for ds in sets for t in ds.texts}
        pixels[root] = {ds.image(i).tobytes() for ds in sets for i in range(len(ds))}
    assert len(texts[corpus]) > 100 and not texts[corpus] & texts[toy]
    assert len(pixels[corpus]) > 100 and not pixels[corpus] & pixels[toy]
    assert data.read(os.path.join(corpus, "products", "meta.json"))["source"] == "corpus"
    assert np.mean([len(t.split()) for t in texts[corpus]]) < 6  # alt-text: short


def test_the_schedule_warms_up_linearly_then_falls_to_zero_on_a_cosine():
    a = argparse.Namespace(lr=1e-3, warmup=10, steps=110)
    assert [pretrain.lr_at(s, a) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])  # step 0 trains
    assert pretrain.lr_at(10, a) == pytest.approx(1e-3) and pretrain.lr_at(60, a) == pytest.approx(5e-4)
    assert pretrain.lr_at(110, a) == pytest.approx(0, abs=1e-12)


def test_the_temperature_is_clamped_as_clip_clamps_it(pretrained, toy, tmp_path, monkeypatch):
    # a CLIP whose logit scale starts above log(100): a step clamps it back to 100, CLIP's maximum
    monkeypatch.setattr(pretrain, "zero_shot_report", lambda *a: None)
    monkeypatch.setattr(toy_module, "TINY_CLIP", {**TINY, "init_logit_scale": 5.0})
    final = pretrain.main(["--quick", "--corpus", str(pretrained[0] / "corpus"), "--toy", toy, "--steps", "1",
                           "--out_dir", str(tmp_path)])[0]
    scale = torch.load(final, weights_only=True)["state_dict"]["logit_scale"]
    assert scale.item() == pytest.approx(math.log(100), abs=1e-6)  # not 5.0 - lr
