"""table4.py --quick end to end: single-task teachers, then students distilled from them, then the table. Every
Table 4 row the README lists (each single-task run, base MTL, MTL + distillation, --sampler uniform and
round_robin, --xaa false on the tasks it supports, --tsa false, --bottleneck 128, --fusion modality) trains a
few steps and is evaluated on every one of its tasks: no row can silently break again."""
import json
import math
import os

import table4
from tasks import ALL, TASKS


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
    # re-running skips every finished run: nothing is trained or evaluated again
    stamps = {n: os.path.getmtime(out / n / "results.json") for n in runs}
    table4.main(["--quick", "--out", str(out), "--data", toy])
    assert stamps == {n: os.path.getmtime(out / n / "results.json") for n in runs}
