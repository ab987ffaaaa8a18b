"""The trainer end to end on a small ToyFashion: resume, DDP, NaN, learning. CPU, tiny CLIP."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import prepare
import train
from conftest import TINY
from tasks import ALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = json.dumps({**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 48}})


def args(toy, out, *extra):
    return ["--data", toy, "--out_dir", str(out), "--clip_config", CLIP, "--pretrained", "", "--context_length", "48",
            "--bottleneck", "8", "--batch_size", "8", "--lr", "1e-3", "--backbone_lr", "1e-3", "--warmup_iters", "2",
            "--num_workers", "0", "--log_interval", "1", "--eval_interval", "1000", "--eval_batches", "2",
            "--ckpt_interval", "4", *extra]


def weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]


def log_rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_exact_resume(toy, tmp_path):
    train.main(args(toy, tmp_path / "straight", "--max_iters", "8"))
    train.main(args(toy, tmp_path / "halves", "--max_iters", "4"))
    train.main(args(toy, tmp_path / "halves", "--max_iters", "8", "--resume", "true"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "halves")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tasks = [r["task"] for r in log_rows(tmp_path / "straight") if "task" in r]
    assert len(set(tasks)) >= 3  # the 8 steps really mixed tasks


def test_only_the_sampled_task_changes(toy, tmp_path):
    train.main(args(toy, tmp_path / "a", "--max_iters", "1", "--ckpt_interval", "1"))
    task = log_rows(tmp_path / "a")[0]["task"]
    train.main(args(toy, tmp_path / "b", "--max_iters", "0", "--ckpt_interval", "1"))
    after, before = weights(tmp_path / "a"), weights(tmp_path / "b")
    changed = {}  # task -> did any of its TSA / head tensors change
    for k in before:
        if k.startswith(("tsa.", "heads.")):
            owner = k.split(".")[2 if k.startswith("tsa.") else 1]
            changed[owner] = changed.get(owner, False) or not torch.equal(before[k], after[k])
    assert changed == {t: t == task for t in ("xmr", "tgir", "scr", "fic")}
    assert not torch.equal(before["clip.visual.proj"], after["clip.visual.proj"])  # the shared backbone moved


@pytest.mark.slow
def test_loss_decreases_on_every_task(toy, tmp_path):
    for task in ("xmr", "tgir", "scr", "fic"):
        out = tmp_path / task
        # a from-scratch contrastive model needs ~80 steps to break its initial symmetry
        train.main(args(toy, out, "--task", task, "--max_iters", "120", "--ckpt_interval", "1000"))
        losses = [r["task_loss"] for r in log_rows(out) if "task_loss" in r]
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.85 * first, (task, first, last)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step \d+: .* on task (xmr|tgir|scr|fic)"):
        train.main(args(toy, tmp_path, "--max_iters", "200", "--ckpt_interval", "1", "--lr", "1e6",
                        "--backbone_lr", "1e6", "--warmup_iters", "0"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_unknown_task_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['cap'\]"):
        train.main(args(toy, tmp_path, "--task", "xmr,cap"))


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, "train.py"), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(toy, tmp_path):
    # every task in turn on 2 gloo ranks: same draws (train.py asserts it each step), identical final weights
    out = torchrun(*args(toy, tmp_path / "all", "--max_iters", "8", "--sampler", "round_robin"))
    assert "final weights identical on all 2 ranks" in out
    assert [r["task"] for r in log_rows(tmp_path / "all") if "task" in r] == ["xmr", "tgir", "scr", "fic"] * 2
    # gathered negatives: 2 ranks x 4 gives the 1-process x 8 losses, step after step (the exact
    # gradient of the gather is checked in test_tasks.py). Weights are not compared: Adam turns
    # float noise in near-zero gradients into lr-sized steps.
    torchrun(*args(toy, tmp_path / "ddp", "--task", "xmr,tgir", "--max_iters", "4"))
    train.main(args(toy, tmp_path / "single", "--task", "xmr,tgir", "--max_iters", "4"))
    a, b = log_rows(tmp_path / "ddp"), log_rows(tmp_path / "single")
    assert [r.get("task") for r in a] == [r.get("task") for r in b] and len(a) == 5
    assert [r.get("loss") for r in a[:4]] == pytest.approx([r.get("loss") for r in b[:4]], abs=1e-5)
    assert a[4]["val_loss"] == pytest.approx(b[4]["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_demo_preset_runs_end_to_end(toy, tmp_path):
    # the README's front-door command, shortened to 3 steps, on the small toy data placed at the demo's own
    # path (data/toy under the working directory; the full ToyFashion takes ~25 s to draw and its 4,000
    # validation images minutes to evaluate): all four tasks trained, the final evaluation report printed
    shutil.copytree(toy, tmp_path / "data" / "toy")
    prepare.upgrade(str(tmp_path / "data" / "toy"), 64)  # its arrays for the demo's 64 px CLIP, as the error says
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "demo", "--max_iters", "3"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "done: 3 steps" in out.stdout and "generating" not in out.stdout
    for protocol in ("XMR full", "XMR random-100", "TGIR", "SCR", "zero-shot", "FIC", "Summary"):
        assert protocol in out.stdout, protocol


def test_demo_draws_toy_data_at_its_own_path_when_missing(tmp_path, monkeypatch):
    import toy as toy_module
    drawn = []
    real = toy_module.make_toy
    monkeypatch.setattr(toy_module, "make_toy",
                        lambda out: drawn.append(out) or real(out, products=240, size=24, image_size=64))
    monkeypatch.chdir(tmp_path)
    cfg, _, _ = train.parse_config(["--preset", "demo", "--batch_size", "8"])
    train_sets, val_sets = train.open_data(cfg, ["xmr", "tgir"], master=True)
    assert drawn == ["data/toy"] and sorted(os.listdir(tmp_path / "data" / "toy")) == ["products", "triplets"]
    assert len(train_sets["xmr"]) > 100 and len(val_sets["tgir"]) > 10
    train.open_data(cfg, ["xmr"], master=True)
    assert drawn == ["data/toy"]  # drawn once: it is there now


def test_demo_never_draws_toy_data_into_an_explicit_data_path(tmp_path):
    # a mistyped --data must not silently become ToyFashion: one line naming it, exit code 2, no traceback
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "demo", "--data", "shop_data"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("train.py: error: shop_data/products not found: make it with python prepare.py")
    assert not os.path.exists(tmp_path / "shop_data") and not os.path.exists(tmp_path / "data")


def test_logged_lr_follows_the_schedule_from_step_0(toy, tmp_path):
    # step s trains at lr * lr_factor(s): the warmup starts at warmup_factor (0.25), not one step into it
    train.main(args(toy, tmp_path, "--task", "xmr", "--max_iters", "3", "--ckpt_interval", "1000"))
    assert [r["lr"] for r in log_rows(tmp_path) if "lr" in r] == pytest.approx([2.5e-4, 6.25e-4, 1e-3])


def test_distilled_loss_is_task_loss_plus_kd(toy, tmp_path):
    # Eq. (16): the loss minimised (and logged) is the task loss plus the teacher's KL
    train.main(args(toy, tmp_path / "teacher", "--task", "xmr", "--max_iters", "2"))
    os.makedirs(tmp_path / "teachers")
    shutil.copy(tmp_path / "teacher" / "ckpt.pt", tmp_path / "teachers" / "xmr.pt")
    common = ("--task", "xmr", "--max_iters", "2", "--seed", "1")
    train.main(args(toy, tmp_path / "student", *common, "--teachers", str(tmp_path / "teachers")))
    rows = [r for r in log_rows(tmp_path / "student") if "kd" in r]
    assert len(rows) == 2 and all(r["kd"] > 1e-3 for r in rows)  # a teacher that differs: kd is not 0
    assert all(r["loss"] == pytest.approx(r["task_loss"] + r["kd"], abs=1e-5) for r in rows)
    # and the step is taken on that sum, not only logged: the same student (seed, data, draws) without
    # the teacher ends elsewhere
    train.main(args(toy, tmp_path / "plain", *common))
    a, b = weights(tmp_path / "student"), weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("tsa.vision.xmr."))


def test_size_sampler_uses_the_training_set_sizes(toy, tmp_path, capsys):
    # p(task) ~ |D_task| of the training data (ToyFashion's val/train ratio differs between products and
    # triplets, so any other split gives other probabilities)
    train.main(args(toy, tmp_path, "--max_iters", "0"))
    found = re.findall(r"(\w+) p=([\d.]+) \(n=(\d+)\)", capsys.readouterr().out)
    assert [t for t, _, _ in found] == ALL
    n = {t: int(k) for t, _, k in found}
    cfg = {**train.config, "data": toy, "clip_config": TINY, "context_length": 48}
    assert n == {t: len(ds) for t, ds in train.open_data(cfg, ALL, True)[0].items()}
    for t, p, k in found:
        assert float(p) == pytest.approx(int(k) / sum(n.values()), abs=1e-3), t



def test_help_shows_every_preset_and_its_values():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0
    text = out.stdout[out.stdout.index("presets ("):]
    for name, values in train.presets.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        for key, value in values.items():  # every value a preset sets, as it sets it
            assert f"{key}={'toy.CLIP' if key == 'clip_config' else repr(value)}" in line, (name, key)
    assert "out_dir='out-demo'" in text and "lr_steps=(650,)" in text and "scales its warmup_iters" in text


def test_a_preset_scales_its_schedule_to_max_iters_and_says_so():
    cfg, _, notes = train.parse_config(["--preset", "demo", "--max_iters", "400", "--out_dir", "o"])
    assert (cfg["warmup_iters"], cfg["lr_steps"]) == (25, (325,))  # the demo's 50 / 650 of 800, halved
    assert notes == ["--preset demo with --max_iters 400: warmup_iters 25 and lr_steps (325,), scaled from its "
                     "800 steps"]
    cfg, _, notes = train.parse_config(["--preset", "teacher", "--max_iters", "3000", "--lr_steps", "100"])
    assert (cfg["warmup_iters"], cfg["lr_steps"]) == (0, (100,)) and "(the command line's ['lr_steps'] win)" in notes[0]
    cfg, _, notes = train.parse_config(["--preset", "demo"])  # the preset's own length: nothing to scale or say
    assert (cfg["max_iters"], cfg["warmup_iters"], cfg["lr_steps"], notes) == (800, 50, (650,), [])


def test_the_demo_preset_warns_before_writing_another_run_into_out_demo():
    for extra in (["--task", "scr"], ["--data", "data/shop"]):
        _, _, notes = train.parse_config(["--preset", "demo", *extra])
        assert notes == ["warning: --preset demo writes to out-demo, over the demo's own run: give --out_dir to keep "
                         "this run apart"]
        assert train.parse_config(["--preset", "demo", *extra, "--out_dir", "mine"])[2] == []


@pytest.mark.parametrize("argv,names,said", [
    (["--task", "xmr"], ["xmr"], "single-task run of xmr (a teacher for distillation); Table 4 row 4"),
    (["--task", "fic", "--tsa", "false"], ["fic"], "single-task run of fic (a teacher for distillation); Table 4 row 3"),
    (["--task", "cma"], ["cma"], "single-task run of cma (a teacher for distillation)"),
    ([], ALL, "multi-task run of ['xmr', 'tgir', 'scr', 'fic'] without distillation (base MTL: no --teachers); "
              "Table 4 row 8"),
    (["--tsa", "false"], ALL, "without distillation (base MTL: no --teachers); Table 4 row 7"),
    (["--xaa", "false", "--task", "xmr,tgir,scr"], ["xmr", "tgir", "scr"], "Table 4 row 6"),
    (["--task", "xmr,scr"], ["xmr", "scr"], "multi-task run of ['xmr', 'scr'] without distillation (base MTL: no "
                                            "--teachers)"),
    (["--teachers", "T"], ALL, "distilled from the single-task teachers in T; Table 4 row 9"),
    (["--teachers", "T", "--sampler", "round_robin"], ALL, "in T; Table 4 row 11"),
    (["--teachers", "T", "--bottleneck", "256"], ALL, "in T; Table 4 row 17"),
    (["--teachers", "T", "--fusion", "modality"], ALL, "distilled from the single-task teachers in T"),
    (["--bottleneck", "128"], ALL, "without distillation (base MTL: no --teachers); Table 4 row 8"),
    (["--teachers", "T", "--bottleneck", "128", "--sampler", "uniform"], ALL, "the single-task teachers in T"),
    (["--preset", "demo"], ALL, "(base MTL: no --teachers); Table 4 row 8"),
])
def test_the_start_up_line_says_what_runs(argv, names, said):
    cfg, _, _ = train.parse_config(argv)
    line = train.describe(cfg, names)
    assert line.endswith(said), line
    assert ("Table 4 row" in said) == ("Table 4 row" in line)  # a row only where one applies


# ---------------------------------------------------------------------------- a step that never waits on the host
HOST_READS = ("item", "tolist", "__bool__")  # Tensor methods that bring a tensor's value to the host


def steps_of(events):
    """[(name, step)] in call order -> {step: [names of the reads made during that step]}: a step begins
    where train.py asks lr_factor for its learning rate (once per step) and ends where the next begins."""
    out, step = {}, None
    for name, s in events:
        if name == "step":
            step = s
            out[step] = []
        elif step is not None:
            out[step].append(name)
    return out


def test_a_step_reads_nothing_from_the_device_between_log_intervals(toy, tmp_path, monkeypatch):
    # every task in turn, each distilled from a teacher, logs every 4 steps: the steps in between read nothing
    # back (what a GPU would wait for), the steps that log read their window of losses once
    for t in ALL:
        train.main(args(toy, tmp_path / f"t_{t}", "--task", t, "--max_iters", "1"))
        os.makedirs(tmp_path / "teachers", exist_ok=True)
        shutil.copy(tmp_path / f"t_{t}" / "ckpt.pt", tmp_path / "teachers" / f"{t}.pt")
    events, real_lr = [], train.lr_factor
    monkeypatch.setattr(train, "lr_factor", lambda step, cfg: events.append(("step", step)) or real_lr(step, cfg))
    def counted(real, name):  # the method, which also records that it was called
        return lambda self, *a, **k: events.append((name, None)) or real(self, *a, **k)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a: events.append(("equal", None)) or real_equal(*a))
    train.main(args(toy, tmp_path / "run", "--max_iters", "9", "--log_interval", "4", "--sampler", "round_robin",
                    "--teachers", str(tmp_path / "teachers")))
    reads = steps_of(events)
    assert sorted(reads) == list(range(9))
    assert {s: reads[s] for s in (0, 1, 2, 4, 5, 6)} == dict.fromkeys((0, 1, 2, 4, 5, 6), [])  # xmr, tgir, scr, fic
    assert "tolist" in reads[3] and "tolist" in reads[7]  # the log steps: the counting sees reads where they are
    assert [r["task"] for r in log_rows(tmp_path / "run") if "task" in r] == ["fic", "fic", "xmr"]  # steps 4, 8, 9


@pytest.mark.slow
def test_no_collective_but_the_losses_own_between_log_intervals(toy, tmp_path):
    # 2 gloo ranks, every task in turn: between log intervals a step calls torch.distributed only for XMR's and
    # TGIR's negatives from all ranks (gathered forward, summed backward); nothing guards a step any more
    script = tmp_path / "count.py"
    script.write_text(f"""
import json, os, sys, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import train
events, real_lr = [], train.lr_factor
train.lr_factor = lambda step, cfg: events.append(("step", step)) or real_lr(step, cfg)
for name in ("all_reduce", "all_gather", "broadcast", "barrier", "reduce", "all_gather_object", "gather",
             "scatter", "reduce_scatter", "all_to_all", "send", "recv"):
    real = getattr(dist, name)
    counted = (lambda real, name: lambda *a, **k: events.append((name, None)) or real(*a, **k))(real, name)
    setattr(dist, name, counted)
train.main(sys.argv[1:])
json.dump(events, open({str(tmp_path)!r} + f"/events{{os.environ['RANK']}}.json", "w"))
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           *args(toy, tmp_path / "run", "--max_iters", "8", "--log_interval", "4", "--sampler", "round_robin")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        calls = steps_of([tuple(e) for e in json.load(open(tmp_path / f"events{rank}.json"))])
        negatives = {"xmr": ["all_gather", "all_gather", "all_reduce", "all_reduce"],  # image and text features
                     "tgir": ["all_gather", "all_reduce"], "scr": [], "fic": []}  # the target images; none
        assert {s: calls[s] for s in (0, 1, 2, 4, 5, 6)} == {s: negatives[ALL[s % 4]] for s in (0, 1, 2, 4, 5, 6)}
        assert calls[3] == ["all_reduce"] * 3  # fic's step (none), then its log: the tasks' check (min, max), the mean


def test_a_non_finite_loss_between_logs_stops_at_the_next_check_naming_its_step(toy, tmp_path, monkeypatch):
    # an infinite learning rate at step 5 leaves non-finite weights, so step 6's loss is not finite: the check at
    # step 8 (log_interval 4) names step 6 and the step-4 checkpoint, and writes nothing non-finite
    real_lr = train.lr_factor
    monkeypatch.setattr(train, "lr_factor", lambda step, cfg: float("inf") if step == 5 else real_lr(step, cfg))
    with pytest.raises(FloatingPointError, match=r"^step 6: loss is nan on task \w+; stopped\. Last good checkpoint: "
                                                 r".*ckpt\.pt \(step 4\)$"):
        train.main(args(toy, tmp_path, "--max_iters", "12", "--log_interval", "4", "--ckpt_interval", "4"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
