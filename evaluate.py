"""
Evaluate a checkpoint: every task of the model through its row's protocols (tasks.py, protocols.py), then
the summary: mu per task (the mean of its headline metrics, the paper's Sec. 4) beside chance, the paper
and single-task runs (Delta = (mu - mu_STL) / mu_STL), and the parameter table.

    python evaluate.py CKPT [--tasks all|NAME,...] [--json OUT] [--pictures DIR] [--stl CKPT,...]
                            [--beam N] [--caption_limit N] [--noisy true|false] [--data ROOT[,task=ROOT...]]
                            [--batch_size B]
"""
import argparse
import json
import time
from types import SimpleNamespace

import torch

import cli
import data
import pictures
from metrics import mean
from model import CLIP_MODEL, from_checkpoint, read_checkpoint
from tasks import TASKS, param_table


def load_model(path, device="cpu"):
    """A checkpoint, for inference -> (model in eval mode, the run's config + its "step" and "labels"
    {task: {attribute: class names}}). Nothing is downloaded: the weights are the checkpoint's."""
    ckpt = read_checkpoint(path)
    model = from_checkpoint(ckpt)
    cfg = {**ckpt["config"], "step": ckpt["step"], "labels": ckpt["model_args"].get("labels", {})}
    return model.to(device).eval(), cfg


def full_size(cfg):
    """Whether the paper's figures belong beside this run's: the paper's backbone, by name (no custom CLIP
    config), not on ToyFashion. Otherwise the report says so and prints chance levels alone."""
    return cfg["model"] == CLIP_MODEL and not cfg.get("clip_config") and not cfg.get("toy")


def show(r):  # print one result: its protocol, then each metric beside its std, chance and paper figure
    print(f"\n{r['protocol']} [{r['seconds']} s]")
    for k, v in r["metrics"].items():
        c, p, s = (r.get(d, {}).get(k) for d in ("chance", "paper", "std"))
        line = f"  {k:<36}" + ("   n/a" if v is None else f"{v:6.2f}")
        line += f" ± {s:5.2f}" if s is not None else ""
        line += f"   chance {c:6.2f}" if c is not None else ""
        line += f"   paper {p:6.2f}" if p is not None else ""
        print(line)
    for h, lam in r.get("lambda_image_weight", {}).items():
        print(f"  mean lambda (image weight) {h}: " + ", ".join(f"{v} {x:.3f}" for v, x in lam.items()))


def run_tasks(model, cfg, names, opts):
    """{result name: result} of every protocol of every task in names, printed as each is done."""
    for task in names:
        if task not in TASKS or not TASKS[task].evaluate:  # never a silent skip
            raise ValueError(f"task {task!r} of the checkpoint has no evaluation: give its row in "
                             f"tasks.TASKS an `evaluate` protocol")
    roots = cli.data_roots(opts.data or cfg["data"], names)
    keys = {t: TASKS[t].keys for t in names}
    datasets = data.open_datasets({t: TASKS[t].data for t in names}, roots, "val", model.context_length,
                                  model.image_size, False, cfg, keys)  # alive to the end: see protocols.memo
    results = {}
    for task in names:
        row = TASKS[task]
        for protocol in row.evaluate:
            t0 = time.time()
            new = protocol(model, task, row, datasets[task], opts)
            for name, r in new.items():
                r.update(task=task, seconds=round(time.time() - t0, 1))
                if opts.full_size and name in row.paper:
                    r["paper"] = row.paper[name]
                show(r)
            results.update(new)
    return results


def summarize(results, stl, params):
    """mu per task (Sec. 4) over its results' mu metrics, the same mean of the chance levels and of the
    paper's figures, and Delta against a single-task mu where given. Printed; returned as a dict."""
    mu = {}
    for r in results.values():
        if r.get("mu"):
            mu.setdefault(r["task"], {w: [] for w in ("metrics", "chance", "paper")})
            for w in mu[r["task"]]:
                mu[r["task"]][w] += [r.get(w, {}).get(k) for k in r["mu"]]
    mu = {t: {w: mean(v) for w, v in m.items()} for t, m in mu.items()}
    for t, v in mu.items():
        v.update(stl=stl.get(t), delta=(v["metrics"] - stl[t]) / stl[t] if stl.get(t) else None)
    print("\nSummary: mu = mean of a task's headline metrics, Delta = (mu - mu_STL) / mu_STL "
          "(the paper's Sec. 4)\n"
          f"  {'task':<8} {'mu':>7} {'chance':>7} {'paper':>7} {'mu_STL':>7} {'Delta':>8}")

    def cell(x, pct=False):
        if x is None:
            return f"{'-':>7}"
        return f"{100 * x:+7.2f}%" if pct else f"{x:7.2f}"
    for t, v in mu.items():
        print(f"  {t:<8} " + " ".join(cell(v[w]) for w in ("metrics", "chance", "paper", "stl"))
              + f" {cell(v['delta'], True)}")
    heads = ", ".join(f"{t} {n:,}" for t, n in params["heads"].items())
    print(f"  parameters: CLIP {params['clip']:,}, TSA per task {params['tsa_per_task']:,}, "
          f"XAA {params['xaa']:,}, heads {heads}; total {params['total']:,}; "
          f"saving vs one single-task model per task {100 * params['saving']:.1f} %")
    return mu


def evaluate(path, args):
    model, cfg = load_model(path, args.device)
    names = list(model.tasks) if args.tasks == "all" else args.tasks.split(",")
    unknown = [n for n in names if n not in model.tasks]
    if unknown:
        raise ValueError(f"--tasks {args.tasks}: {unknown} not in the checkpoint's tasks {list(model.tasks)}")
    opts = SimpleNamespace(**{**vars(args), "pictures": bool(args.pictures)}, full_size=full_size(cfg),
                           memo={})
    note = "" if opts.full_size else "; not a full-size run: chance levels, no paper figures"
    print(f"evaluating {path} (step {cfg['step']}, tasks {names}) on {args.data or cfg['data']} val, "
          f"device {args.device}{note}")
    results = run_tasks(model, cfg, names, opts)
    stl = {}  # task -> mu of a single-task baseline, for Delta
    for s in filter(None, args.stl.split(",")):
        print(f"\n---- single-task baseline {s} ----")
        sub = evaluate(s, argparse.Namespace(**{**vars(args), "stl": "", "pictures": "", "tasks": "all"}))
        stl.update({t: v["metrics"] for t, v in sub["summary"]["mu"].items() if t in names})
    params = param_table(model)
    mu = summarize(results, stl, params)
    shown = {}  # name -> rows of pictures; out of the JSON (they hold arrays)
    for r in results.values():
        shown.update(r.pop("pictures", {}))
    results = dict(checkpoint=path, step=cfg["step"], data=args.data or cfg["data"], full_size=opts.full_size,
                   **results, summary=dict(mu=mu, params=params))
    if args.pictures:
        results["pictures"] = pictures.save_all(shown, args.pictures, model.image_size)
        print("pictures: " + ", ".join(results["pictures"]))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint of train.py")
    p.add_argument("--tasks", default="all", help="all (the checkpoint's tasks) or a comma list of them")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--pictures", default="", help="write PNG grids into this directory")
    p.add_argument("--stl", default="", help="single-task checkpoints (comma list): Delta against their mu")
    p.add_argument("--noisy", type=cli.boolean, default=True,
                   help="classifiers: also CMA-CLIP's noisy-modality passes (texts / images shuffled); false "
                        "skips them, two thirds of a classifier's evaluation")
    p.add_argument("--beam", type=int, default=1, help="captioning beam size (1 = greedy)")
    p.add_argument("--caption_limit", type=int, default=0, help="caption only the first N images (0 = all)")
    p.add_argument("--data", default="", help="prepared data ROOT[,task=ROOT...] (default: the checkpoint's)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = p.parse_args(argv)
    results = evaluate(args.ckpt, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    cli.command_line(main)
