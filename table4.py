"""
Table 4 of the FAME-ViL paper in miniature, on ToyFashion with the demo's CLIP, in two regimes: `scratch`
(the demo's recipe: a CLIP trained from scratch at one learning rate) and `pretrained` (the paper's: the CLIP
pretrained by pretrain.py, fine-tuned with Table 5's split, the backbone at 1/100 of the adapters' and heads'
rate, a warm-up from 0.25 over the first ninth, x0.1 at 5/9 and 8/9 of the run: the paper's 10k, 50k and 80k
of 90k). Single-task runs (the teachers, and mu_STL), multi-task learning without and with multi-teacher
distillation, and the ablations that cost little more. Every run is train.py then evaluate.py; the table
holds each row's mu per task, Delta = (mu - mu_STL) / mu_STL, its parameters and its wall time, and per run
how far the backbone's weights moved and how the gradient splits between backbone, adapters and heads. The
MTL and MTL + MTD runs log their validation losses ten times: Fig. 5 in miniature (fig5.png).

    python table4.py [--regime scratch|pretrained] [--steps 800] [--seeds 3] [--lr 1e-2] [--rows MTL,...]
    python table4.py --quick      # a few steps per run on the test suite's tiny CLIP: minutes

Each task gets about the same number of updates in its single-task run as in the multi-task runs, as in
the paper (30k / 6k single-task steps against 90k multi-task steps in all): a single-task run takes
p_task x --steps steps, p the size-proportional sampling probability. Runs use the demo's recipe, its
schedule scaled to their length (the supplement: single-task runs keep the hyper-parameters, shorter).
Re-running skips finished runs and resumes a killed one from its checkpoint.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import time

import torch

import cli
import evaluate
import model
import pretrain
import toy
import train
from tasks import ALL, TASKS

# name -> (its row in the paper's Table 4, train.py flags, distilled from the single-task teachers, seeded
# runs). Rows without distillation are Table 4's groups I-II; the STL row is one run per task.
ROWS = {
    "STL": ("(4) FAME-ViL(ST)", [], False, True),
    "MTL": ("(8) base MTL", [], False, True),  # seed 0 is exactly the demo (python train.py --preset demo)
    "MTL + MTD": ("(9) FAME-ViL", [], True, True),
    "MTL + MTD, uniform": ("(10) uniform sampling", ["--sampler", "uniform"], True, False),
    "MTL + MTD, round-robin": ("(11) round-robin", ["--sampler", "round_robin"], True, False),
    "MTL, no XAA": ("(6) MTL + TSA", ["--xaa", "false"], False, False),
    "MTL, no TSA": ("(7) MTL + XAA", ["--tsa", "false"], False, False),
    "MTL, bottleneck 128": ("(16) wider adapters, no MTD", ["--bottleneck", "128"], False, False),
    "MTL, modality fusion": ("beyond: CMA-CLIP's fusion", ["--fusion", "modality"], False, False),
}


def row_tasks(flags):  # the tasks a row can train: without XAAs nothing can caption
    return [t for t in ALL if "--xaa" not in flags or TASKS[t].mode != "generative"]


def recipe(steps, args):
    """train.py flags: the demo's recipe (its preset scales its warmup, 50 of 800, and its LR step, at 650 of
    800, to the run's length); in the pretrained regime, from the pretrained CLIP with Table 5's schedule."""
    base = ["--preset", "demo", "--final_eval", "false", "--data", args.data, "--max_iters", str(steps),
            "--eval_interval", str(steps), "--log_interval", "10",
            "--ckpt_interval", str(steps if args.quick else max(1, steps // 4))]  # --quick: one, at the end
    if args.regime == "pretrained":  # Table 5: 1e-6 : 1e-4, warm-up 10k of 90k from 0.25, x0.1 at 50k and 80k
        base += ["--pretrained", args.pretrained, "--lr", str(args.lr), "--backbone_lr", str(args.lr / 100),
                 "--warmup_iters", str(round(steps / 9)), "--warmup_factor", "0.25",
                 "--lr_steps", f"{round(steps * 5 / 9)},{round(steps * 8 / 9)}"]
    if args.quick:  # the tests' tiny CLIP and small batches
        base += ["--clip_config", json.dumps(toy.TINY_CLIP), "--context_length", "32", "--bottleneck", "8",
                 "--batch_size", "8", "--eval_batches", "2", "--log_interval", "1"]
    return base


def plan(args, probs):
    """[(row, seed, run name, train.py flags)] in the order they must run: teachers first."""
    runs, chosen = [], [r for r in ROWS if not args.rows or r in args.rows.split(",")]
    if any(ROWS[r][2] for r in chosen) and "STL" not in chosen:  # a distilled row needs its teachers
        chosen.insert(0, "STL")
    for row in chosen:
        _, flags, distilled, seeded = ROWS[row]
        for seed in range(args.seeds if seeded else 1):
            tasks = row_tasks(flags)
            if row == "STL":  # one run per task, as many updates as it gets in the multi-task runs
                for t in tasks:
                    steps = max(1, round(probs[t] * args.steps))
                    runs.append((row, seed, f"stl-{t}-s{seed}", recipe(steps, args) + ["--task", t]))
                continue
            steps = round(args.steps * sum(probs[t] for t in tasks))
            extra = ["--teachers", os.path.join(args.out, f"teachers-s{seed}")] if distilled else []
            if row in ("MTL", "MTL + MTD"):  # Fig. 5: their validation losses ten times a run
                extra += ["--eval_interval", str(max(1, steps // 10))]
            name = row.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-") + f"-s{seed}"
            runs.append((row, seed, name, recipe(steps, args) + ["--task", ",".join(tasks), *flags, *extra]))
    return [(row, seed, name, flags + ["--seed", str(seed), "--out_dir", os.path.join(args.out, name)])
            for row, seed, name, flags in runs]


@contextlib.contextmanager
def logged_to(path):
    """stdout and stderr into a file: Python's, and at the file-descriptor level the Java scorers'."""
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run(name, flags, args):
    """Train (resuming a killed run) and evaluate one run; returns its results.json, timed."""
    out = flags[flags.index("--out_dir") + 1]
    done = os.path.join(out, "results.json")
    if os.path.isfile(done):
        return json.load(open(done))
    t0, ckpt = time.time(), os.path.join(out, "ckpt.pt")
    steps = int(flags[flags.index("--max_iters") + 1])
    resume = os.path.isfile(ckpt) and model.read_checkpoint(ckpt)["step"] > 0
    if not resume:
        shutil.rmtree(out, ignore_errors=True)  # a run killed before its first checkpoint starts over
    os.makedirs(out, exist_ok=True)
    if resume:
        flags = flags + ["--resume", "true"]
    with logged_to(os.path.join(out, "run.log")):
        train.main(flags)
        t_train = time.time() - t0
        r = evaluate.main([ckpt, "--workers", "0", "--caption_limit", str(args.caption_limit),
                           "--noisy", "false"])  # the table reads mu alone: no noisy-modality passes
    r.update(train_seconds=round(t_train), seconds=round(time.time() - t0), steps=steps,
             **dynamics(out, flags, args))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"kd"' in line]
    kd = [row["kd"] for row in log if row["kd"] > 0]  # the distillation term, in step order
    if kd:  # its mean over the first and the last quarter of the logged steps
        quarter = max(1, len(kd) // 4)
        r["kd_first"], r["kd_last"] = statistics.mean(kd[:quarter]), statistics.mean(kd[-quarter:])
    json.dump(r, open(done, "w"), indent=1)
    return r


def dynamics(out, flags, args):
    """How far the run moved the CLIP backbone (|theta - theta_0| / |theta_0| over its weights), and the mean
    share of each logged step's squared gradient norm in the backbone, the adapters and the heads."""
    ckpt = model.read_checkpoint(os.path.join(out, "ckpt.pt"))
    final = {k[5:]: v.float() for k, v in ckpt["model"].items() if k.startswith("clip.")}
    if args.regime == "pretrained":
        start = torch.load(args.pretrained, weights_only=True)["state_dict"]
    else:  # train.py's initialisation: the run's seed, then the model
        torch.manual_seed(int(flags[flags.index("--seed") + 1]))
        start = model.build(ckpt["model_args"]).clip.state_dict()
    moved = sum((final[k] - start[k].float()).pow(2).sum() for k in final) ** .5
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"grad_backbone"' in line]
    squares = [[r[f"grad_{p}"] ** 2 for p in ("backbone", "adapters", "heads")] for r in rows]
    share = [statistics.mean(s[i] / sum(s) for s in squares) for i in range(3)]
    return dict(backbone_moved=float(moved / sum(v.float().pow(2).sum() for v in start.values()) ** .5),
                grad_share=dict(zip(("backbone", "adapters", "heads"), share)))


def teachers(args, seed, results):  # out/teachers-s<seed>/<task>.pt: the seed's single-task checkpoints
    path = os.path.join(args.out, f"teachers-s{seed}")
    os.makedirs(path, exist_ok=True)
    for t in ALL:
        link = os.path.join(path, f"{t}.pt")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(results[f"stl-{t}-s{seed}"]["checkpoint"]), link)


def table(results, plan_):
    """{row: {tasks: {task: mu (mean over seeds), std, Delta, within noise}, params, seconds, ...}}, noise:
    for the rows the plan ran (Delta only where the STL row ran)."""
    mu = {}  # (row, task) -> [mu of each seed]
    for row, seed, name, _ in plan_:
        for t, v in results[name]["summary"]["mu"].items():
            mu.setdefault((row, t), []).append(v["metrics"])
    stl = {t: statistics.mean(mu[("STL", t)]) if ("STL", t) in mu else None for t in ALL}

    def spread(v):
        return statistics.pstdev(v) if len(v) > 1 else None
    # the noise of a task's mu: its spread over seeds, the largest of the seeded rows'
    seeded = [r for r, (_, _, _, s) in ROWS.items() if s]
    noise = {t: max([spread(mu[(r, t)]) or 0 for r in seeded if (r, t) in mu], default=0) for t in ALL}
    rows = {}
    for row in dict.fromkeys(r for r, *_ in plan_):
        cells = {}
        for t in ALL:
            if (row, t) in mu:
                m = statistics.mean(mu[(row, t)])
                delta = None if row == "STL" or not stl[t] else (m - stl[t]) / stl[t]
                cells[t] = dict(mu=m, std=spread(mu[(row, t)]), delta=delta,
                                within_noise=delta is not None and abs(m - stl[t]) <= 2 * noise[t])
        runs = [name for r, seed, name, _ in plan_ if r == row]
        first = [n for r, seed, n, _ in plan_ if r == row and seed == 0]  # one run per task, or one run
        params = sum(results[n]["summary"]["params"]["total"] for n in first)
        deltas = [c["delta"] for c in cells.values() if c["delta"] is not None]
        rows[row] = dict(paper=ROWS[row][0], tasks=cells, params=params, runs=len(runs),
                         mean_mu=statistics.mean(c["mu"] for c in cells.values()),
                         mean_delta=statistics.mean(deltas) if deltas else None,
                         seconds=sum(results[n]["seconds"] for n in runs),
                         moved=statistics.mean(results[n]["backbone_moved"] for n in runs),
                         to_adapters=statistics.mean(results[n]["grad_share"]["adapters"] for n in runs))
    for r in rows.values():
        r["params_vs_stl"] = r["params"] / rows["STL"]["params"] - 1 if "STL" in rows else None
    return rows, noise


def markdown(rows, noise):
    head = ["row", "Table 4", *(f"{t} mu (Delta)" for t in ALL), "mean mu", "mean Delta", "#params (vs STL)",
            "backbone moved", "gradient to adapters", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in rows.items():
        cells = []
        for t in ALL:
            c = r["tasks"].get(t)
            if c is None:
                cells.append("-")
                continue
            text = f"{c['mu']:.2f}" + (f" ± {c['std']:.2f}" if c["std"] is not None else "")
            if c["delta"] is not None:
                text += f" ({100 * c['delta']:+.1f} %{', noise' if c['within_noise'] else ''})"
            cells.append(text)
        delta = "-" if r["mean_delta"] is None else f"{100 * r['mean_delta']:+.1f} %"
        vs = "" if r["params_vs_stl"] is None else f" ({100 * r['params_vs_stl']:+.0f} %)"
        mean = f"{r['mean_mu']:.2f}" + ("" if len(r["tasks"]) == len(ALL) else f" ({len(r['tasks'])} tasks)")
        dynamics = f"{100 * r['moved']:.2f} % | {100 * r['to_adapters']:.1f} %"
        lines.append(f"| {row} | {r['paper']} | " + " | ".join(cells) + f" | {mean} | {delta} | "
                     f"{r['params'] / 1e6:.1f} M{vs} | {dynamics} | {r['seconds'] / 60:.1f} min |")
    spread = ", ".join(f"{t} ± {s:.2f}" for t, s in noise.items())
    lines.append(f"\nNoise: a Delta marked `noise` is within twice the seed spread of that task's mu "
                 f"({spread}), the largest of the seeded rows'. Backbone moved: |theta - theta_0| / "
                 f"|theta_0| of CLIP's weights; gradient to adapters: the mean share of a logged step's "
                 f"squared gradient norm in the TSAs and XAAs (the rest: backbone and heads).")
    return "\n".join(lines)


def figure(args, plan_):
    """Fig. 5 in miniature: each task's validation loss over training, base MTL against MTL + MTD (each seed
    thin, their mean bold) -> out/fig5.png."""
    import matplotlib
    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ALL), figsize=(3.6 * len(ALL), 3), constrained_layout=True)
    for row, colour in (("MTL", "tab:blue"), ("MTL + MTD", "tab:orange")):
        logs = [[json.loads(line) for line in open(os.path.join(args.out, name, "log.jsonl"))
                 if "val_loss" in line] for r, _, name, _ in plan_ if r == row]
        for ax, t in zip(axes, ALL):
            curves = [([v["step"] for v in log], [v["val_loss"][t] for v in log]) for log in logs]
            for steps, losses in curves:
                ax.plot(steps, losses, color=colour, alpha=.3, lw=1)
            mean = [statistics.mean(c) for c in zip(*(losses for _, losses in curves))]
            ax.plot(curves[0][0], mean, color=colour, lw=2, label=f"{row} ({len(curves)} seeds)")
            ax.set(title=t, xlabel="step", ylabel="validation loss" if t == ALL[0] else None)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fig. 5 in miniature: validation loss, base MTL vs MTL + MTD ({args.regime} regime)",
                 fontsize=10)
    path = os.path.join(args.out, "fig5.png")
    fig.savefig(path, dpi=110)
    return path


def parse_args(argv):  # -> args, the regime's defaults filled in
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=("scratch", "pretrained"), default="scratch",
                   help="scratch: the demo's recipe; pretrained: pretrain.py's CLIP and Table 5's split")
    p.add_argument("--steps", type=int, default=800, help="multi-task steps (800: the demo's, and the "
                   "pretrained regime's best of 400 and 800 in the sweep that RESULTS.md reports)")
    p.add_argument("--lr", type=float, default=1e-2, help="pretrained regime: the adapters' and heads' peak "
                   "rate, the backbone's 1/100 of it (the scratch regime keeps the demo's 1e-3 everywhere)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the STL, MTL and MTL + MTD rows")
    p.add_argument("--rows", default="", help="comma-separated rows of the table (default: all); a distilled "
                   "row brings the STL row, its teachers")
    p.add_argument("--pretrained", default="", help="pretrained regime: the backbone (default: "
                   "out-pretrain/toy_clip.pt, made by pretrain.py when missing)")
    p.add_argument("--out", default="", help="every run's directory, the table, its JSON and fig5.png "
                   "(default: out-table4, or out-table4-pretrained)")
    p.add_argument("--data", default="data/toy", help="a prepared ToyFashion (drawn there if missing)")
    p.add_argument("--caption_limit", type=int, default=1000, help="captioning: the first N val images")
    p.add_argument("--quick", action="store_true", help="a few steps per run on the tiny CLIP (the tests)")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.rows.split(","))) - set(ROWS)
    if unknown:
        p.error(f"unknown --rows {', '.join(sorted(unknown))}; the rows: {', '.join(ROWS)}")
    if args.pretrained and args.regime != "pretrained":
        p.error("--pretrained is the pretrained regime's backbone: add --regime pretrained")
    if args.pretrained and not os.path.isfile(args.pretrained):
        p.error(f"--pretrained {args.pretrained}: no such file (python pretrain.py writes one)")
    args.out = args.out or ("out-table4" if args.regime == "scratch" else "out-table4-pretrained")
    if args.quick:
        args.steps, args.seeds, args.caption_limit = min(args.steps, 24), min(args.seeds, 2), 8
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"generating ToyFashion into {args.data} ...")
        toy.make_toy(args.data)
    if args.regime == "pretrained" and not args.pretrained:  # pretrain once; later calls reuse it
        flags = ["--toy", args.data]
        if args.quick:  # the tiny CLIP's own corpus and checkpoint, inside the quick run's directory
            out = os.path.join(args.out, "pretrain")
            flags += ["--quick", "--out_dir", out, "--corpus", os.path.join(out, "corpus")]
        args.pretrained = pretrain.main(flags)[0]
    cfg = train.parse_config(recipe(args.steps, args))[0]  # the runs' model and data: the sampler's sizes
    sizes = {t: len(ds) for t, ds in train.open_data(cfg, ALL, True)[0].items()}
    probs = dict(zip(ALL, train.task_probs([sizes[t] for t in ALL], "size").tolist()))
    plan_, results, t0 = plan(args, probs), {}, time.time()
    for i, (row, seed, name, flags) in enumerate(plan_):
        if row != "STL" and any("--teachers" == f for f in flags):
            teachers(args, seed, results)
        results[name] = run(name, flags, args)
        r = results[name]
        mus = ", ".join(f"{t} {v['metrics']:.2f}" for t, v in r["summary"]["mu"].items())
        kd = f"; kd {r['kd_first']:.4f} -> {r['kd_last']:.4f}" if "kd_first" in r else ""
        print(f"[{i + 1}/{len(plan_)}] {name}: {r['steps']} steps, {r['seconds']} s; mu {mus}{kd}",
              flush=True)
    rows, noise = table(results, plan_)
    text = markdown(rows, noise)
    if "MTL" in rows and "MTL + MTD" in rows:
        text += f"\n\n![Fig. 5 in miniature]({os.path.basename(figure(args, plan_))})"
    spent = sum(r["seconds"] for r in results.values())  # every run's own time, also when resumed
    print(f"\nTable 4 in miniature, {args.regime} regime ({args.steps} multi-task steps, {args.seeds} seeds; "
          f"{len(plan_)} runs, {spent / 60:.1f} min of runs, {(time.time() - t0) / 60:.1f} min this call)"
          f"\n\n{text}")
    json.dump(dict(regime=args.regime, steps=args.steps, seeds=args.seeds, lr=args.lr, rows=rows, noise=noise,
                   runs=results), open(os.path.join(args.out, "table4.json"), "w"), indent=1)
    open(os.path.join(args.out, "table4.md"), "w").write(text + "\n")
    return rows, results


if __name__ == "__main__":
    cli.command_line(main)
