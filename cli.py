"""
The command lines of this project: one rule for bad input, which every script's `__main__` follows
(command_line), and train.py's config dict turned into flags (config_parser), as nanoGPT's configurator.py
does for its train.py.
"""
import argparse
import ast
import io
import json
import os
import sys
import time
import tokenize


def command_line(main):
    """Run a script's main() the way every command line of this project does: bad input (a missing path,
    FileNotFoundError; a bad value or record, ValueError) is one line on stderr and exit code 2, its message
    naming the culprit and the fix; any other exception is a bug and keeps its traceback."""
    try:
        return main()
    except (FileNotFoundError, ValueError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)


def comments(path, name):
    """{key: the comment on its line} of the dict literal `name = dict(key=value,  # comment ...)` in the
    source file `path`: each flag's --help is the comment a reader sees beside its default."""
    src = open(path).read()
    notes = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.type == tokenize.COMMENT}
    call = next(n.value for n in ast.parse(src).body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return {kw.arg: notes.get(kw.value.end_lineno, "") for kw in call.keywords}


def boolean(s):  # a strict bool: "--tsa flase" is an error, not False
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def ints(s):  # "50000,80000" -> (50000, 80000)
    return tuple(int(x) for x in s.split(",") if x)


def config_parser(config, path, doc, presets, choices, shown=repr):
    """An argparse parser with one --KEY flag per key of `config` (its type from the default's, its help from
    the comment beside it in `path`), --preset NAME, and in --help what every preset sets (each value through
    `shown`). A flag left out is absent from the parsed namespace, so a caller can tell given from default."""
    presets_help = ["presets (each sets these defaults; the command line overrides any of them):"]
    presets_help += [f"  {name}: " + ", ".join(f"{k}={shown(v)}" for k, v in values.items())
                     for name, values in presets.items()]
    presets_help.append("A preset that sets max_iters scales its warmup_iters and lr_steps to a --max_iters "
                        "given on the command line (unless those are given too), and says so.")
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage=f"python {os.path.basename(path)} [--preset NAME] [--KEY VALUE ...]",
                                epilog="\n".join(presets_help))
    p.add_argument("--preset", choices=sorted(presets), help="a named set of defaults (listed below)")
    parsers = {bool: boolean, tuple: ints, dict: json.loads}  # other types parse themselves
    helps = comments(path, "config")
    for key, value in config.items():
        p.add_argument(f"--{key}", type=parsers.get(type(value), type(value)), default=argparse.SUPPRESS,
                       choices=choices.get(key), help=f"{helps[key]} (default: {value!r})")
    return p


def preset(presets, name, given, config):
    """The defaults preset `name` sets (none: {}), its schedule (warmup_iters, lr_steps) scaled to a max_iters
    the command line `given` sets, unless it sets them too -> (preset, notes saying what was scaled)."""
    values, notes = dict(presets.get(name, {})), []
    if "max_iters" in values and "max_iters" in given:  # the preset's schedule, stretched to the run's length
        scale = given["max_iters"] / values["max_iters"]
        values["warmup_iters"] = round(values.get("warmup_iters", config["warmup_iters"]) * scale)
        values["lr_steps"] = tuple(round(s * scale) for s in values.get("lr_steps", config["lr_steps"]))
        kept = [k for k in ("warmup_iters", "lr_steps") if k in given]
        notes.append(f"--preset {name} with --max_iters {given['max_iters']}: warmup_iters "
                     f"{values['warmup_iters']} and lr_steps {values['lr_steps']}, scaled from its "
                     f"{presets[name]['max_iters']} steps" + f" (the command line's {kept} win)" * bool(kept))
    return values, notes


def data_roots(spec, names):
    """A run's data spec "ROOT[,task=ROOT,...]" -> {task: root} for the task names: the default root,
    then per-task overrides."""
    default, *overrides = [s.strip() for s in spec.split(",")]
    if not default or default.partition("=")[0] in names:
        raise ValueError(f"data spec {spec!r}: the default ROOT comes first, then task=ROOT overrides")
    roots = dict.fromkeys(names, default)
    for o in overrides:
        task, eq, root = o.partition("=")
        if not eq or task.strip() not in roots:
            raise ValueError(f"data spec {spec!r}: {o!r} is not task=ROOT for one of the tasks {list(names)}")
        roots[task.strip()] = root.strip()
    return roots


def progress(items, total, what, every=0.1, after=5.0):
    """Yield from items, saying on stderr at every ~10 % of `total` how far `what` is, its rate and its ETA,
    once it has run `after` seconds: long work (a 293k-image conversion, an evaluation) reports, quick work
    (tests, ToyFashion) stays quiet."""
    t0, step = time.time(), max(1, int(total * every))
    for n, item in enumerate(items, 1):
        yield item
        elapsed = time.time() - t0
        if (n % step == 0 or n == total) and elapsed >= after:
            rate = n / elapsed
            eta = (total - n) / rate
            print(f"  {what}: {n:,}/{total:,}, {rate:,.1f}/s, ETA {eta:,.0f} s", file=sys.stderr, flush=True)
