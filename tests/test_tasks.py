"""Task table, distillation and the trainer's pure functions (no data needed)."""
import copy

import pytest
import torch

import model
import train
from conftest import randomize_adapters
from distill import distill_loss, kl
from tasks import TASKS, model_tasks


def test_size_sampler_matches_dataset_sizes():
    names, sizes = ["xmr", "tgir", "scr", "fic"], [60_147, 18_000, 60_147, 60_147]
    cfg = dict(train.config, sampler="size")
    probs = train.task_probs(sizes, "size")
    assert probs.tolist() == pytest.approx([0.3031, 0.0907, 0.3031, 0.3031], abs=1e-4)  # 60,147 / 198,441 etc.
    draws = [train.draw_task(s, names, probs, cfg) for s in range(20_000)]
    for name, p in zip(names, probs.tolist()):
        assert draws.count(name) / len(draws) == pytest.approx(p, abs=0.012)
    assert draws == [train.draw_task(s, names, probs, cfg) for s in range(20_000)]  # a function of (seed, step)
    uniform = [train.draw_task(s, names, train.task_probs(sizes, "uniform"), cfg) for s in range(20_000)]
    assert all(uniform.count(n) / 20_000 == pytest.approx(0.25, abs=0.012) for n in names)


def test_round_robin_cycles():
    cfg = dict(train.config, sampler="round_robin")
    names = ["xmr", "tgir", "scr", "fic"]
    assert [train.draw_task(s, names, None, cfg) for s in range(9)] == names * 2 + ["xmr"]


def test_lr_schedule_table5():
    f = lambda s: train.lr_factor(s, train.config)
    assert [f(0), f(5_000), f(10_000), f(49_999), f(50_000), f(80_000), f(89_999)] == \
        pytest.approx([0.25, 0.625, 1.0, 1.0, 0.1, 0.01, 0.01])
    assert 1e-4 * f(0) == pytest.approx(2.5e-5) and 1e-6 * f(80_000) == pytest.approx(1e-8)


def test_shards_are_disjoint_and_resumable():
    a = train.shard_batches(50, 4, 0, 2, seed=3, salt=1, start=0)
    b = train.shard_batches(50, 4, 1, 2, seed=3, salt=1, start=0)
    first = [next(a) for _ in range(6)]  # 6 global batches of 8: one epoch of 48
    seen = [i for batch in first + [next(b) for _ in range(6)] for i, _ in batch]
    assert len(seen) == 48 and len(set(seen)) == 48
    assert [next(a) for _ in range(3)] == [next(train.shard_batches(50, 4, 0, 2, 3, 1, start=s)) for s in (6, 7, 8)]
    with pytest.raises(ValueError, match="smaller than one global batch"):
        next(train.shard_batches(7, 4, 0, 2, 0, 0, 0))


def test_param_groups_no_decay_on_vectors(tiny_clip):
    m = model.FAMEViL(tiny_clip, model_tasks(["xmr", "scr"], {"scr": {"class": 5}}), bottleneck=8)
    groups = train.param_groups(m, train.config)
    for g in groups:
        assert all(p.ndim >= 2 for p in g["params"]) == (g["weight_decay"] > 0)
    backbone = {id(p) for n, p in m.named_parameters() if n.startswith("clip.")}
    assert {g["base_lr"] for g in groups if id(g["params"][0]) in backbone} == {1e-6}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    only = train.param_groups(m, dict(train.config, train_only="heads.*,xaa.*"))
    assert sum(p.numel() for g in only for p in g["params"]) == \
        sum(p.numel() for n, p in m.named_parameters() if n.startswith(("heads.", "xaa.")))


def batch_for(task, B=4):
    import open_clip
    g = torch.Generator().manual_seed(0)
    text = open_clip.tokenize(["red dress with dots", "navy shirt", "black boots", "a bag"][:B], context_length=32)
    img = lambda: torch.randn(B, 3, 32, 32, generator=g)
    return {"image": img(), "ref": img(), "target": img(), "text": text, "class": torch.arange(B) % 5,
            "attrs": torch.stack([torch.arange(B) % 3, torch.arange(B) % 5], 1)}


CLASSES = {"category": 3, "subcategory": 5, "class": 5}  # the attrs columns of batch_for; its class: subcategory


@pytest.mark.parametrize("task", list(TASKS))
def test_distillation_zero_for_identical_teacher(tiny_clip, task):
    student = model.FAMEViL(tiny_clip, model_tasks(list(TASKS), {t: CLASSES for t in TASKS}), bottleneck=8)
    randomize_adapters(student, std=0.1)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.eval()
    batch = batch_for(task)
    logits = TASKS[task].logits(student, batch, task)
    assert distill_loss(teacher, task, batch, logits).item() == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        for p in teacher.tsa["vision"][task].parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for p in teacher.heads[task].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    kd = distill_loss(teacher, task, batch, logits)
    assert kd.item() > 1e-4
    kd.backward()  # the gradient reaches the student only
    assert all(p.grad is None for p in teacher.parameters())
    assert student.heads[task].parameters().__next__().grad is not None


def test_kl_is_teacher_to_student():
    t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    pt, ps = t.softmax(-1), s.softmax(-1)
    assert kl(t, s).item() == pytest.approx((pt * (pt.log() - ps.log())).sum().item(), rel=1e-5)


def test_caption_loss_ignores_padding_and_predicts_eot(tiny_clip):
    m = model.FAMEViL(tiny_clip, model_tasks(["fic"], {}), bottleneck=8)
    batch = batch_for("fic")
    logits = TASKS["fic"].logits(m, batch, "fic")
    n_targets = int(batch["text"].argmax(-1).sum())  # positions 1..EOT of every caption
    assert logits[0].shape == (n_targets, 49408)
    noisy = dict(batch, text=batch["text"].clone())
    noisy["text"][batch["text"] == 0] = 1234  # garbage after EOT changes neither logits nor loss
    noisy_logits = TASKS["fic"].logits(m, noisy, "fic")
    assert torch.allclose(noisy_logits[0], logits[0], atol=1e-5)
    assert TASKS["fic"].loss(noisy_logits, noisy).item() == pytest.approx(TASKS["fic"].loss(logits, batch).item())


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['xmrr'\]"):
        model_tasks(["xmr", "xmrr"], {})


def _gather_worker(rank, world, init_file, out):
    import torch.distributed as dist
    from tasks import contrastive_loss, gather
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    images, texts, weight = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 4, requires_grad=True)
    mine = slice(rank * 4, rank * 4 + 4)
    fi, ft = images[mine] @ weight, texts[mine] @ weight  # this rank's features (4, 4)
    contrastive_loss((fi @ gather(ft).T, ft @ gather(fi).T), None).backward()
    dist.all_reduce(weight.grad)  # what DDP does: average the parameter gradients over ranks
    torch.save(weight.grad / world, out + f".{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_give_the_full_batch_gradient(tmp_path):
    from tasks import contrastive_loss
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "g")), nprocs=2)
    torch.manual_seed(0)
    images, texts, weight = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 4, requires_grad=True)
    fi, ft = images @ weight, texts @ weight
    contrastive_loss((fi @ ft.T, ft @ fi.T), None).backward()  # one process, the whole batch of 8
    for rank in range(2):
        assert torch.allclose(torch.load(str(tmp_path / "g") + f".{rank}"), weight.grad, atol=1e-6)


def test_teacher_check_lists_every_architecture_mismatch(tiny_clip, tmp_path):
    from conftest import TINY
    from distill import load_teacher
    args = dict(model="ViT-B-16-quickgelu", pretrained="", clip_config=TINY, bottleneck=16, tsa=True, xaa=True,
                fusion="add", tasks=model_tasks(["scr", "xmr"], {"scr": CLASSES}))
    torch.save(dict(model_args=args, model=model.build(args).state_dict()), tmp_path / "t.pt")
    assert load_teacher(str(tmp_path / "t.pt"), "scr", args).heads["scr"].out_features == 5  # a fitting one loads
    with pytest.raises(ValueError, match=r"t\.pt does not fit task 'scr': bottleneck is 16, the student's 8"):
        load_teacher(str(tmp_path / "t.pt"), "scr", dict(args, bottleneck=8))
    # SCR fuses image and text: its XAAs and its fusion change its outputs, so both are checked and listed
    other = dict(args, tsa=False, xaa=False, fusion="modality")
    with pytest.raises(ValueError, match="tsa is True, the student's False; xaa is True, the student's False; "
                                         "fusion is 'add', the student's 'modality'"):
        load_teacher(str(tmp_path / "t.pt"), "scr", other)
    # XMR runs each tower alone: the XAAs and the fusion never touch its outputs, only the TSA does
    with pytest.raises(ValueError, match=r"does not fit task 'xmr': tsa is True, the student's False$"):
        load_teacher(str(tmp_path / "t.pt"), "xmr", other)
    assert load_teacher(str(tmp_path / "t.pt"), "xmr", dict(args, xaa=False, fusion="modality")) is not None


def test_task_draws_depend_on_the_seed():
    # two seeds must give two task sequences (a seed-blind draw makes every run's schedule the same)
    names, probs = ["xmr", "tgir", "scr", "fic"], train.task_probs([1, 1, 1, 1], "uniform")
    draws = {seed: [train.draw_task(s, names, probs, dict(train.config, seed=seed)) for s in range(200)]
             for seed in (0, 1)}
    assert draws[0] != draws[1]
    assert sum(a == b for a, b in zip(draws[0], draws[1])) < 100  # about 1/4 agree by chance, not all
