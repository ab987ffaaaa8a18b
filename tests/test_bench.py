# bench.py end to end on the tiny config. No timing assertions: speed targets live in bench.py's table.
import json
import math

import bench


def test_bench_quick_runs_every_section(tmp_path):
    bench.main(["--quick", "--json", str(tmp_path / "b.json")])
    out = json.loads((tmp_path / "b.json").read_text())
    assert set(bench.SECTIONS) <= set(out)
    for section in bench.SECTIONS:
        numbers = [v for v in out[section].values() if not isinstance(v, bool)]
        assert numbers and all(math.isfinite(v) for v in numbers), (section, out[section])
    assert out["decode"]["same_tokens"] is True  # KV-cached greedy decoding == recomputed, token for token
