"""table4.py --quick end to end: single-task teachers, then students distilled from them, then the table. Every
Table 4 row the README lists (each single-task run, base MTL, MTL + distillation, --sampler uniform and
round_robin, --xaa false on the tasks it supports, --tsa false, --bottleneck 128, --fusion modality) trains a
few steps and is evaluated on every one of its tasks: no row can silently break again. Both regimes: from
scratch (the demo's recipe) and from a CLIP pretrained by pretrain.py, with Table 5's learning-rate split."""
import json
import math
import os

import open_clip
import pytest
import torch

import model
import table4
import train
from conftest import TINY
from tasks import ALL, TASKS


@pytest.mark.slow
def test_quick_table_has_every_row_and_task(toy, tmp_path):
    out = tmp_path / "t4"
    rows, runs = table4.main(["--quick", "--out", str(out), "--data", toy])
    assert set(rows) == set(table4.ROWS)
    for row, (_, flags, distilled, seeded) in table4.ROWS.items():
        expected = table4.row_tasks(flags)
        assert set(rows[row]["tasks"]) == set(expected), row  # every task of the row evaluated
        assert all(math.isfinite(c["mu"]) for c in rows[row]["tasks"].values()), row
        assert math.isfinite(rows[row]["params_vs_stl"]) and rows[row]["seconds"] >= 0
    assert "fic" not in rows["MTL, no XAA"]["tasks"]  # nothing can caption without the XAAs
    assert all(TASKS[t].mode != "generative" for t in rows["MTL, no XAA"]["tasks"])
    assert rows["MTL"]["params_vs_stl"] < -0.5  # one model instead of four
    # each single-task run is one task's checkpoint, each seeded row has two seeds in --quick
    assert {n for n in runs if n.startswith("stl-")} == {f"stl-{t}-s{s}" for t in ALL for s in (0, 1)}
    assert all(c["std"] is not None for c in rows["MTL + MTD"]["tasks"].values())
    # the distilled students: a non-zero KD term that falls as the student learns from its teachers
    for name in ("mtl-mtd-s0", "mtl-mtd-s1"):
        assert runs[name]["kd_first"] > runs[name]["kd_last"] > 0, name
    assert "kd_first" not in runs["mtl-s0"]  # base MTL has no teachers
    saved = json.load(open(out / "table4.json"))
    assert set(saved["rows"]) == set(table4.ROWS)
    assert (out / "table4.md").read_text().count("\n| ") == len(rows)  # a markdown line per row
    assert (out / "fig5.png").is_file()  # base MTL against MTL + MTD, per task
    assert all(0 < r["moved"] and 0 < r["to_adapters"] < 1 for r in rows.values())
    # re-running skips every finished run: nothing is trained or evaluated again
    stamps = {n: os.path.getmtime(out / n / "results.json") for n in runs}
    table4.main(["--quick", "--out", str(out), "--data", toy])
    assert stamps == {n: os.path.getmtime(out / n / "results.json") for n in runs}


def test_the_regime_sets_the_start_and_the_learning_rates_of_every_run(toy, tmp_path):
    torch.manual_seed(123)
    backbone = open_clip.CLIP(**TINY).state_dict()
    torch.save({"state_dict": backbone}, tmp_path / "clip.pt")
    probs = {t: 1 / len(ALL) for t in ALL}
    common = ["--quick", "--seeds", "1", "--data", toy, "--out", str(tmp_path / "t4")]
    scratch = table4.plan(table4.parse_args(common), probs)
    pretrained = table4.plan(table4.parse_args(common + ["--regime", "pretrained", "--lr", "5e-3", "--pretrained",
                                                         str(tmp_path / "clip.pt")]), probs)
    assert [name for _, _, name, _ in scratch] == [name for _, _, name, _ in pretrained]  # the same runs
    for (_, _, name, flags), (_, _, _, flags_p) in zip(scratch, pretrained):
        cfg, cfg_p = train.parse_config(flags)[0], train.parse_config(flags_p)[0]
        steps = cfg["max_iters"]
        assert (cfg["pretrained"], cfg["lr"], cfg["backbone_lr"]) == ("", 1e-3, 1e-3), name  # the demo's
        assert (cfg_p["pretrained"], cfg_p["lr"], cfg_p["backbone_lr"]) == (str(tmp_path / "clip.pt"), 5e-3, 5e-5)
        assert cfg_p["warmup_factor"] == .25 and cfg_p["warmup_iters"] == round(steps / 9), name
        assert cfg_p["lr_steps"] == (round(steps * 5 / 9), round(steps * 8 / 9)), name
    # the initial weights, as train.py builds them: the pretrained CLIP in every architecture the plan has
    firsts = {row: flags for row, seed, _, flags in pretrained if "--teachers" not in flags}
    for row, flags in firsts.items():
        out = tmp_path / "init" / row.replace(" ", "_")
        train.main(flags + ["--max_iters", "0", "--out_dir", str(out)])
        clip = {k[5:]: v for k, v in model.read_checkpoint(str(out / "ckpt.pt"))["model"].items() if k[:5] == "clip."}
        assert all(torch.equal(clip[k], backbone[k]) for k in backbone), row
    flags = next(f for row, _, _, f in scratch if row == "MTL")
    train.main(flags + ["--max_iters", "0", "--out_dir", str(tmp_path / "init" / "scratch")])
    clip = model.read_checkpoint(str(tmp_path / "init" / "scratch" / "ckpt.pt"))["model"]
    assert not torch.equal(clip["clip.visual.conv1.weight"], backbone["visual.conv1.weight"])


@pytest.mark.slow
def test_quick_pretrained_regime_pretrains_then_runs_teachers_students_table_and_figure(toy, tmp_path):
    out = tmp_path / "t4p"
    rows, runs = table4.main(["--quick", "--regime", "pretrained", "--rows", "MTL + MTD,MTL", "--seeds", "1",
                              "--out", str(out), "--data", toy])
    final = out / "pretrain" / "toy_clip.pt"  # pretrained once, by the table
    assert set(rows) == {"STL", "MTL", "MTL + MTD"}  # the distilled row brought its teachers
    assert all(c["delta"] is not None for c in rows["MTL + MTD"]["tasks"].values())
    for name, r in runs.items():  # every run started from the pretrained CLIP, its backbone at lr / 100
        ckpt = model.read_checkpoint(r["checkpoint"])
        assert ckpt["model_args"]["pretrained"] == str(final), name
        assert 0 < r["backbone_moved"] < 0.05 and math.isclose(sum(r["grad_share"].values()), 1), name
    assert runs["mtl-mtd-s0"]["kd_first"] > runs["mtl-mtd-s0"]["kd_last"] > 0
    assert (out / "fig5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(fig5.png)" in (out / "table4.md").read_text()
    assert json.load(open(out / "table4.json"))["regime"] == "pretrained"


@pytest.mark.parametrize("argv, said", [(["--rows", "MTL,STT"], "unknown --rows STT"),
                                        (["--pretrained", "x.pt"], "add --regime pretrained"),
                                        (["--regime", "pretrained", "--pretrained", "x.pt"], "x.pt: no such file")])
def test_bad_table_flags_are_one_line_and_exit_2(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        table4.parse_args(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err
