"""The command lines: a missing path or a bad value is one line naming it and what would fix it, exit code 2,
no traceback; a real bug keeps its traceback. Run in-process through runpy (the scripts' __main__ blocks), and
once as a real subprocess."""
import os
import runpy
import subprocess
import sys

import pytest

import train
from test_train import CLIP, ROOT, args

# (script, its arguments ({toy}, {ckpt}, {tmp} filled in), the one line on stderr: a regex)
CASES = [
    ("train.py", ["--tsa", "flase"], r"train\.py: error: argument --tsa: expected true or false, got 'flase'"),
    ("train.py", ["--sampler", "random"], r"argument --sampler: invalid choice: 'random'"),
    ("train.py", ["--data", "{tmp}/nowhere"],
     r"train\.py: error: .*nowhere/products not found: make it with python prepare\.py fashiongen\|catalogue"),
    ("train.py", ["--task", "xmr,capt", "--data", "{toy}"], r"train\.py: error: unknown task\(s\) \['capt'\]"),
    ("train.py", ["--resume", "true", "--out_dir", "{tmp}/run"],
     r"train\.py: error: .*run/ckpt\.pt: no checkpoint there \(start the run without --resume\)"),
    ("train.py", ["--data", "{toy}", "--xaa", "false", "--clip_config", CLIP.replace("{", "{{").replace("}", "}}"),
                  "--context_length", "48", "--pretrained", ""],
     r"train\.py: error: task 'fic' is generative: its captioner reads the image only through the text-side XAA"),
    ("train.py", ["--data", "{toy}", "--clip_config", CLIP.replace("{", "{{").replace("}", "}}"), "--context_length",
                  "48"], r"train\.py: error: --pretrained openai: with --clip_config, a checkpoint file \(python "
                         r"pretrain\.py writes the toy CLIP's\) or --pretrained '' for random weights"),
    ("evaluate.py", ["{tmp}/none.pt"], r"evaluate\.py: error: .*none\.pt: no checkpoint there \(train one first"),
    ("evaluate.py", ["{ckpt}", "--data", "{tmp}/gone"], r"evaluate\.py: error: .*gone/products not found: make it"),
    ("evaluate.py", ["{ckpt}", "--tasks", "xmr,fic"], r"--tasks xmr,fic: \['fic'\] not in the checkpoint's tasks"),
    ("sample.py", ["{ckpt}", "{tmp}/none.png", "--task", "xmr"], r"sample\.py: error: .*none\.png: no such image"),
    ("sample.py", ["{tmp}/none.pt", "{toy}/products/images/00000_0.png"], r"none\.pt: no checkpoint there"),
    ("sample.py", ["{ckpt}", "{toy}/products/images/00000_0.png", "--task", "xmr"],
     r"sample\.py: error: --task xmr needs --text \(texts to rank for the image\) or --gallery"),
]


@pytest.fixture(scope="module")
def ckpt(toy, tmp_path_factory):  # a 2-step XMR checkpoint on the small toy data
    out = tmp_path_factory.mktemp("cli")
    train.main(args(toy, out, "--task", "xmr", "--max_iters", "2"))
    return str(out / "ckpt.pt")


def run_main(script, argv, monkeypatch):  # python SCRIPT ARGV, in this process
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(script, argv, message, toy, ckpt, tmp_path, monkeypatch, capsys):
    argv = [a.format(toy=toy, ckpt=ckpt, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as stop:  # any other exception would be a traceback
        run_main(script, argv, monkeypatch)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("usage: ")]
    assert len(err) == 1 and __import__("re").search(message, err[0]), err


def test_a_real_bug_keeps_its_traceback(toy, tmp_path, monkeypatch):
    import model

    def broken(*a, **k):  # a bug deep inside: not the user's input
        raise KeyError("a bug")
    monkeypatch.setattr(model, "build", broken)  # what train.py's `from model import build` will find
    with pytest.raises(KeyError, match="a bug"):  # not turned into "error: ..." and exit 2
        run_main("train.py", args(toy, tmp_path, "--max_iters", "1"), monkeypatch)


def test_for_real_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--tsa", "flase"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "train.py: error: argument --tsa: expected true or false, got 'flase'"
