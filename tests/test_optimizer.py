"""train.param_groups as a table: every parameter of a model with every kind of head, adapter and fuser, by NAME.

The rule below is written independently of the code's (which looks at ndim): from train.config's comments and
param_groups' docstring, "backbone vs adapters/heads learning rate; no weight decay on biases, norms and scalars",
spelled out per parameter name. Where the two could disagree, the table says what the code does today:
  * the positional embeddings (2-D) decay, as in open_clip's own training; timm-style rules exempt them;
  * ModalityAttention's w (a weight vector, what an nn.Linear(D, 1) would hold as a 2-D matrix) does not decay;
  * CLIP's logit_scale is trained at the backbone LR (no decay) although FAME-ViL never uses it (no gradient).
"""
import fnmatch
import json

import pytest
import torch

import model
import train
from conftest import TINY

TASKS = {"xmr": ("contrastive", "norm"), "tgir": ("fusion", "norm"), "scr": ("fusion", 5), "fic": ("generative", "lm"),
         "cma": ("contrastive", ("cma", {"category": 3, "subcategory": 5}, 1, 2))}
CFG = dict(train.config, lr=3e-4, backbone_lr=2e-6, weight_decay=0.05)  # three distinct values: no coincidences

DECAY = [  # matrices: Linear / conv / embedding / projection weights
    "clip.visual.conv1.weight", "clip.token_embedding.weight",  # patch and token embeddings
    "clip.visual.positional_embedding", "clip.positional_embedding",  # 2-D: decayed (see the docstring)
    "clip.visual.proj", "clip.text_projection",  # CLIP's projections to the joint space
    "*.attn.in_proj_weight", "*.attn.out_proj.weight", "*.mlp.c_fc.weight", "*.mlp.c_proj.weight",  # CLIP's blocks
    "tsa.*.down.weight", "tsa.*.up.weight",  # TSA (AdaptMLP)
    "xaa.*.q.weight", "xaa.*.k.weight", "xaa.*.v.weight", "xaa.*.mlp.down.weight", "xaa.*.mlp.up.weight",  # XAA
    "heads.scr.weight", "heads.fic.weight", "heads.cma.mlp.*.weight",  # classifier, LM head, CMA-CLIP's MLPs
    "heads.cma.sequence.layers.*.self_attn.in_proj_weight", "heads.cma.sequence.layers.*.self_attn.out_proj.weight",
    "heads.cma.sequence.layers.*.linear1.weight", "heads.cma.sequence.layers.*.linear2.weight",
]
NO_DECAY = [  # biases, LayerNorm weights, scalar scales, ModalityAttention's w, the class embedding
    "*.bias", "*.in_proj_bias",
    "*.ln_1.weight", "*.ln_2.weight", "clip.visual.ln_pre.weight", "clip.visual.ln_post.weight",
    "clip.ln_final.weight", "tsa.*.ln.weight", "xaa.*.ln_q.weight", "xaa.*.ln_kv.weight", "xaa.*.mlp.ln.weight",
    "heads.cma.sequence.layers.*.norm1.weight", "heads.cma.sequence.layers.*.norm2.weight",
    "heads.xmr.scale", "heads.tgir.scale", "tsa.*.scale", "xaa.*.mlp.scale",  # ScaledNorm's and AdaptMLP's s
    "clip.logit_scale",  # a scalar (unused by FAME-ViL)
    "fusers.*.w", "heads.cma.modality.*.w",  # ModalityAttention's w (see the docstring)
    "clip.visual.class_embedding",
]


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    return model.FAMEViL(model.build_clip(config=TINY), TASKS, bottleneck=8, fusion="modality")


def matches(name, patterns):
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def rule(m, cfg, trained):
    """The expected table: {name: (base_lr, weight_decay)} for the names in `trained`, from the name alone
    (and, for the learning rate, whether the tensor belongs to the CLIP module)."""
    backbone = {id(p) for p in m.clip.parameters()}
    out = {}
    for name, p in m.named_parameters():
        if name in trained:
            decays = bool(matches(name, DECAY))
            out[name] = (cfg["backbone_lr"] if id(p) in backbone else cfg["lr"], cfg["weight_decay"] if decays else 0.0)
    return out


def table(m, groups):
    """What param_groups returned, as {name: (base_lr, weight_decay)}; asserts every listed tensor is one of the
    model's, listed once."""
    names = {id(p): n for n, p in m.named_parameters()}
    out = {}
    for g in groups:
        assert set(g) >= {"params", "base_lr", "weight_decay"}
        for p in g["params"]:
            assert id(p) in names, "a tensor that is not the model's"
            assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
            out[names[id(p)]] = (g["base_lr"], g["weight_decay"])
    return out


def test_the_rule_names_every_parameter_once(m):
    # the table is complete and unambiguous: each name is in exactly one of DECAY / NO_DECAY, each pattern is used
    names = [n for n, _ in m.named_parameters()]
    for n in names:
        assert bool(matches(n, DECAY)) != bool(matches(n, NO_DECAY)), (n, matches(n, DECAY), matches(n, NO_DECAY))
    for p in DECAY + NO_DECAY:
        assert any(fnmatch.fnmatchcase(n, p) for n in names), f"pattern {p} matches nothing"
    for prefix in ("clip.", "tsa.", "xaa.vision.", "xaa.text.", "heads.", "fusers.scr.", "fusers.tgir."):
        assert any(n.startswith(prefix) for n in names), prefix  # every kind of parameter is present


def test_every_parameter_in_exactly_its_group(m):
    groups = train.param_groups(m, CFG)
    got, want = table(m, groups), rule(m, CFG, {n for n, _ in m.named_parameters()})
    assert got.keys() == want.keys()  # every trainable parameter, each in exactly one group
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, wrong
    # both directions, spelled out: a decaying group holds only the rule's matrices, a non-decaying one only the rest
    for g in groups:
        names = [n for n, p in m.named_parameters() if any(p is q for q in g["params"])]
        assert all(bool(matches(n, DECAY)) == (g["weight_decay"] == CFG["weight_decay"]) for n in names)
        assert all(n.startswith("clip.") == (g["base_lr"] == CFG["backbone_lr"]) for n in names)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05} and {g["base_lr"] for g in groups} == {3e-4, 2e-6}
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("only, n_trained", [
    ("heads.*,fusers.*,tsa.*.fic.*,xaa.text.*", 28 + 2 + 28 + 34),  # heads 1+1+2+2 + CMA 12+2+8; 2 w; 2x2x7; 2x17
    ("clip.visual.*", 8 + 2 * 12),  # embeddings, proj, ln_pre, ln_post + 12 tensors per block
    ("heads.xmr.scale", 1)])  # a group of one tensor
def test_train_only_leaves_the_frozen_out(m, only, n_trained):
    groups = train.param_groups(m, dict(CFG, train_only=only))
    trained = {n for n, _ in m.named_parameters() if matches(n, only.split(","))}
    assert len(trained) == n_trained  # the patterns select what they say (fnmatch: * crosses dots)
    assert table(m, groups) == rule(m, CFG, trained)  # the frozen are in no group; the trained where the rule says
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trained  # and frozen means requires_grad False
    train.param_groups(m, CFG)  # "" = all: unfreezes everything again
    assert all(p.requires_grad for p in m.parameters())


def cma_parts(m):
    names = {n for n, _ in m.named_parameters()}
    part = {k: {n for n in names if n.startswith(f"heads.cma.{k}.")} for k in ("sequence", "modality", "mlp")}
    part["other heads"] = {n for n in names if n.startswith("heads.") and not n.startswith("heads.cma.")}
    part["fusers"] = {n for n in names if n.startswith("fusers.")}
    assert all(part.values())
    return names, part


@pytest.mark.parametrize("stage", ["warmup", "end2end", "tune"])
def test_cma_stages_train_what_algorithm_1_says(m, stage):
    # CMA_STAGES: warmup = "CLIP and every adapter frozen" (lines 3-4), end2end = everything (line 17), tune = the
    # modality-wise attentions and MLPs, the sequence-wise transformer frozen (lines 22-23); all at lr 1e-5.
    # In a multi-task model, "heads.*" also trains the other tasks' heads, and the --fusion modality fusers (also
    # CMA-CLIP modality-wise attentions) stay frozen in warmup and tune: what the code does today.
    names, part = cma_parts(m)
    cfg = {**train.config, **train.CMA_STAGES[stage]}
    assert (cfg["lr"], cfg["backbone_lr"]) == (1e-5, 1e-5)
    trained = {"warmup": part["sequence"] | part["modality"] | part["mlp"] | part["other heads"],
               "end2end": names,
               "tune": part["modality"] | part["mlp"]}[stage]
    groups = train.param_groups(m, cfg)
    assert table(m, groups) == rule(m, cfg, trained)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trained
    if stage != "end2end":
        assert not any(n.startswith(("clip.", "tsa.", "xaa.")) for n in trained)  # CLIP and every adapter frozen
    train.param_groups(m, CFG)  # leave every parameter trainable for the other tests


def test_after_warm_up_every_parameter_trains_at_its_groups_rate(toy, tmp_path):
    # a real run in the pretrained regime's shape: backbone at lr / 100, warm-up from 0.25 over 2 steps; the rate
    # each parameter had at the last step (3 >= 2) read back from the optimizer's checkpoint, by name
    flags = ["--data", toy, "--out_dir", str(tmp_path), "--clip_config", json.dumps(TINY), "--pretrained", "",
             "--context_length", "32", "--bottleneck", "8", "--batch_size", "8", "--fusion", "modality",
             "--max_iters", "4", "--lr", "4e-3", "--backbone_lr", "4e-5", "--warmup_iters", "2",
             "--warmup_factor", "0.25", "--lr_steps", "100", "--eval_interval", "1000", "--final_eval", "false",
             "--num_workers", "0"]
    train.main(flags)
    ckpt = model.read_checkpoint(str(tmp_path / "ckpt.pt"))
    m = model.from_checkpoint(ckpt)
    names = {id(p): n for n, p in m.named_parameters()}
    rate = {}  # name -> its group's lr at the last step; the optimizer lists its groups in param_groups' order
    for group, saved in zip(train.param_groups(m, ckpt["config"]), ckpt["optimizer"]["param_groups"]):
        assert len(group["params"]) == len(saved["params"])
        rate.update({names[id(p)]: saved["lr"] for p in group["params"]})
    assert rate.keys() == set(names.values())  # every parameter trains
    for name, lr in rate.items():
        assert lr == (4e-5 if name.startswith("clip.") else 4e-3), name
    kinds = {name.split(".")[0] for name in rate}
    assert kinds == {"clip", "tsa", "xaa", "heads", "fusers"}  # TSA, XAA, heads and fusers all at lr
