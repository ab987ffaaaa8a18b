"""Beam search (model.FAMEViL.generate) against an independent reference, on a vocabulary cut to 3 words + EOT.

The LM head's bias is -1e4 for every other token, so every caption generate can return is a short sequence of
those ids, and the reference can score EVERY caption by teacher forcing (caption_states + the head, log_softmax
over the FULL vocabulary, SOT first): exhaustive search, and a plain-Python beam search on those scores.
The beams themselves are observed without reimplementing anything: with use_cache=False each step feeds the
whole prefix (generate's docstring), so a hook on the token embedding sees every step's beams, and a wrapper
around topk sees their scores.
"""
import contextlib
import itertools

import open_clip
import pytest
import torch

import model
from conftest import TINY, randomize_adapters

SOT, EOT = 49406, 49407
WORDS = tuple(open_clip.tokenizer._tokenizer.encode("red navy dress"))  # (736, 5598, 2595)
TOL = 1e-4  # teacher forcing vs generate's incremental decoding: two orderings of the same float computation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: a tiny model runs fastest on one thread
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    fm = model.FAMEViL(model.build_clip(config=TINY), {"xmr": ("contrastive", "norm"), "fic": ("generative", "lm")},
                       bottleneck=8).eval()
    randomize_adapters(fm, std=0.3)  # the XAAs carry the image into the decoder: captions depend on the image
    head, keep = fm.heads["fic"], torch.tensor(WORDS + (EOT,))
    with torch.no_grad():
        bias = torch.full_like(head.bias, -1e4)  # every other token: probability exp(-1e4) = 0
        bias[keep] = head.bias[keep]
        bias[EOT] -= 3  # EOT rarely first
        head.bias.copy_(bias)
        head.weight[keep] *= 2  # sharper, more prefix- and image-dependent choices among the 4 tokens
        # EOT likelier right after "dress": the direction of the states at "dress" is added to EOT's head row,
        # so the best captions end at different lengths
        tokens = torch.tensor([[SOT, *s] for s in itertools.product(WORDS, repeat=3)])  # (27, 4)
        states = fm.caption_states(torch.zeros(len(tokens), 3, 32, 32), tokens, "fic")  # (27, 4, Dt)
        at = tokens == WORDS[-1]
        d = states[at].mean(0) - states[~at].mean(0)
        head.weight[EOT] += 2 * d / d.norm()
    return fm


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (6, 3, 32, 32)


# ----------------------------------------------------------------------------- the reference
def next_logp(m, image, words, max_len):
    """{word prefix: log_softmax (V,) of the next token} for every prefix of < max_len words, by teacher forcing.
    image (1, 3, S, S). The causal decoder makes position a of [SOT, w_1 .. w_n] see only [SOT, w_1 .. w_a]."""
    full = list(itertools.product(words, repeat=max_len - 1))  # every word sequence of max_len - 1 words
    tokens = torch.tensor([[SOT, *s] for s in full])  # (N, max_len)
    with torch.no_grad():
        states = m.caption_states(image.expand(len(full), -1, -1, -1), tokens, "fic")  # (N, max_len, Dt)
        logp = m.heads["fic"](states).log_softmax(-1)  # (N, max_len, V): position a predicts token a + 1
    table = {}
    for s, row in zip(full, logp):
        for a in range(max_len):
            table.setdefault(s[:a], row[a])
    return table


def captions(words, max_len):  # every caption: n < max_len words then EOT, or max_len words without EOT
    return [s + ((EOT,) if n < max_len else ()) for n in range(max_len + 1) for s in itertools.product(words, repeat=n)]


def score(table, caption):  # sum of the log-probabilities of its tokens (EOT included; SOT is given)
    return sum(table[caption[:i]][t].item() for i, t in enumerate(caption))


def finished(caption):
    return bool(caption) and caption[-1] == EOT


def reference_beam(table, words, max_len, K):
    """Beam search on the reference scores: each step, every unfinished beam offers each allowed token, every
    finished beam offers itself unchanged (its score kept); the K best survive; stop when all are finished.
    Returns the best caption and the beams after each step, [{caption: score}, ...]."""
    beams, steps = {(): 0.0}, []
    for _ in range(max_len):
        offers = {}
        for c, s in beams.items():
            if finished(c):
                offers[c] = s
            else:
                offers.update({c + (t,): s + table[c][t].item() for t in (*words, EOT)})
        ranked = sorted(offers.items(), key=lambda cs: -cs[1])
        assert len(ranked) <= K or ranked[K - 1][1] - ranked[K][1] > TOL  # no near-tie at the cut: well posed
        beams = dict(ranked[:K])
        steps.append(beams)
        if all(finished(c) for c in beams):
            break
    return max(beams, key=beams.get), steps


@contextlib.contextmanager
def eot_shifted(m, shift):  # EOT's logit raised by shift inside the block: every caption more likely to end
    with torch.no_grad():
        m.heads["fic"].bias[EOT] += shift
    try:
        yield
    finally:
        with torch.no_grad():
            m.heads["fic"].bias[EOT] -= shift


def caption_of(row):
    """(1 + n,) ids from generate -> the caption after SOT up to its EOT; asserts SOT first, zeros after EOT."""
    ids = row.tolist()
    assert ids[0] == SOT
    ids = ids[1:]
    if EOT in ids:
        end = ids.index(EOT) + 1
        assert ids[end:] == [0] * (len(ids) - end), ids  # zero-padded after EOT
        ids = ids[:end]
    return tuple(ids)


@pytest.fixture
def observe(monkeypatch, m):
    """A context manager recording, per decoding step inside it, the beams fed (use_cache=False feeds the whole
    prefix: (B*K, 1 + t)) and the scores topk selected (B, K); the beams selected at step t are fed at step t + 1."""
    fed, scores, on = [], [], [False]
    hook = m.text.token_embedding.register_forward_hook(
        lambda mod, inputs, out: fed.append(inputs[0].clone()) if on[0] else None)
    real_method = torch.Tensor.topk

    def method(self, *args, **kwargs):
        out = real_method(self, *args, **kwargs)
        if on[0]:
            scores.append(out[0].clone())
        return out
    monkeypatch.setattr(torch.Tensor, "topk", method)
    monkeypatch.setattr(torch, "topk", lambda x, *args, **kwargs: method(x, *args, **kwargs))

    @contextlib.contextmanager
    def watching():
        fed.clear()
        scores.clear()
        on[0] = True
        try:
            yield fed, scores
        finally:
            on[0] = False
    yield watching
    hook.remove()


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("words, max_len", [(WORDS, 3), (WORDS[1:], 4)])
def test_wide_beam_is_exhaustive_search(m, images, words, max_len, use_cache):
    # K = the number of captions: no caption can fall out of the beam, so generate must return the argmax over all
    every = captions(words, max_len)  # 3 words, 3 steps: 13 with EOT + 27 without = 40; 2 words, 4 steps: 15 + 16
    K = len(every)
    out = m.generate(images[:4], "fic", max_len, beam_size=K, use_cache=use_cache)  # (4, 1 + max_len)
    lengths = set()
    for b in range(4):
        table = next_logp(m, images[b:b + 1], words, max_len)
        ranked = sorted(every, key=lambda c: -score(table, c))
        best = ranked[0]
        assert score(table, best) - score(table, ranked[1]) > 1e-3  # a unique argmax: well posed
        got = caption_of(out[b])
        assert got == best, (b, got, best)
        assert score(table, got) == pytest.approx(score(table, best), abs=TOL)
        lengths.add(len(best))
    assert len(lengths) > 1  # the argmax is not always the longest (or the shortest) caption


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_small_beam_equals_reference_beam_search_and_beats_greedy(m, images, K, use_cache):
    max_len = 4
    beam = m.generate(images, "fic", max_len, beam_size=K, use_cache=use_cache)  # (6, 1 + n)
    greedy = m.generate(images, "fic", max_len, beam_size=1, use_cache=use_cache)  # (6, 1 + n')
    better = 0
    for b in range(len(images)):
        table = next_logp(m, images[b:b + 1], WORDS, max_len)
        assert caption_of(beam[b]) == reference_beam(table, WORDS, max_len, K)[0], b
        assert caption_of(greedy[b]) == reference_beam(table, WORDS, max_len, 1)[0], b
        # not a theorem for every model (a beam may drop the greedy prefix), but true of these six images
        s_beam, s_greedy = score(table, caption_of(beam[b])), score(table, caption_of(greedy[b]))
        assert s_beam >= s_greedy - TOL, b
        better += s_beam > s_greedy + 1e-3
    assert better >= 1  # at least one image where the beam finds a better caption than greedy decoding


@pytest.mark.parametrize("K, shift", [(2, 0), (3, 0), (4, 0), (2, 6)])
def test_every_beam_keeps_its_own_caption_and_score(m, images, observe, K, shift):
    # at every step, for each image: its K beams are distinct, are the reference beam search's K best, and each
    # slot's score is the teacher-forced score of that slot's caption, finished beams included (they move
    # between slots when re-selected). shift 6: one image's beams all finish at step 2 while the others go on
    max_len, B = 4, len(images)
    with eot_shifted(m, shift):
        tables = [next_logp(m, images[b:b + 1], WORDS, max_len) for b in range(B)]
        refs = [reference_beam(t, WORDS, max_len, K) for t in tables]
        with observe() as (fed, scores):
            out = m.generate(images, "fic", max_len, beam_size=K, use_cache=False)  # (6, 1 + n)
    assert len(scores) == len(fed) == max(len(steps) for _, steps in refs)  # stops once every beam is finished
    assert fed[0].tolist() == [[SOT]] * (B * K)  # every beam starts as SOT alone
    for b, (table, (best, steps)) in enumerate(zip(tables, refs)):
        for t in range(len(scores)):
            beams = steps[min(t, len(steps) - 1)]  # an image whose beams are all finished keeps them
            got_scores = scores[t].view(B, K)[b].tolist()
            if t + 1 < len(fed):  # the beams selected at step t, fed at step t + 1: (K, 2 + t)
                got = [caption_of(r) for r in fed[t + 1].view(B, K, -1)[b]]
                assert len(set(got)) == K, (b, t, got)  # distinct, finished or not
                assert set(got) == set(beams), (b, t)
                for c, s in zip(got, got_scores):
                    assert s == pytest.approx(beams[c], abs=TOL), (b, t, c)
            else:  # the last step's beams are not fed again: their scores, and the best one is returned
                assert sorted(got_scores) == pytest.approx(sorted(beams.values()), abs=TOL), (b, t)
        assert caption_of(out[b]) == best
        assert score(table, best) == pytest.approx(max(scores[-1].view(B, K)[b].tolist()), abs=TOL)
    if shift:
        assert min(len(steps) for _, steps in refs) < len(scores)  # an image sat finished while others went on
    else:
        assert {len(best) for best, _ in refs} >= {2, max_len}  # some captions end early, some do not


def test_a_caption_that_ended_early_is_returned_zero_padded_with_its_own_score(m, images, observe):
    # image 0, K = 2, 4 steps: "dress <EOT>" is the best caption but not the greedy one. It finishes at step 2 in
    # slot 1, behind the other beam, waits there through step 3 and is re-selected into slot 0 at step 4 when the
    # other beam's score falls below its own; it is returned padded with zeros to the width of the longest beam
    max_len, K, image = 4, 2, images[0:1]
    table = next_logp(m, image, WORDS, max_len)
    early = (WORDS[2], EOT)
    ranked = sorted(captions(WORDS, max_len), key=lambda c: -score(table, c))
    assert ranked[0] == early  # the argmax over every caption
    greedy = caption_of(m.generate(image, "fic", max_len, beam_size=1)[0])
    assert greedy != early and len(greedy) == max_len  # greedy decoding misses it: a real search case
    with observe() as (fed, scores):
        out = m.generate(image, "fic", max_len, beam_size=K, use_cache=False)  # (1, 5)
    assert out.tolist() == [[SOT, *early, 0, 0]]
    assert len(fed) == len(scores) == max_len  # the other beam kept the search going to max_len
    slots = []
    for t in (1, 2, 3):  # the steps after it finished: its slot and score among the K selected
        if t + 1 < len(fed):
            rows = [caption_of(r) for r in fed[t + 1]]
            assert early in rows and not all(finished(c) for c in rows), t  # it waits while the other goes on
            slots.append(rows.index(early))
        else:
            slots.append(int(scores[t][0].argmax()))  # the final step: the best slot
        assert scores[t][0, slots[-1]].item() == pytest.approx(score(table, early), abs=TOL), t  # its own score
    assert slots == [1, 1, 0]  # re-selection moved it: its caption and its score travelled together


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("shift, K", [(0, 3), (6, 2)])
def test_batch_equals_each_image_alone_when_beams_end_at_different_lengths(m, images, use_cache, shift, K):
    # EOT allowed: one image's beams finish early while another's go on; neither may change the other's caption.
    # shift 0: the captions end at different lengths; shift 6: one image's search, alone, stops 2 steps early, so
    # its output is narrower (padded here with zeros to the batch's width)
    max_len = 4
    with eot_shifted(m, shift):
        together = m.generate(images, "fic", max_len, beam_size=K, use_cache=use_cache)  # (6, 1 + n)
        alone = [m.generate(images[b:b + 1], "fic", max_len, beam_size=K, use_cache=use_cache)[0] for b in range(6)]
    if shift:
        assert len({len(a) for a in alone}) > 1  # the images' searches really stop at different steps
    else:
        assert len({len(caption_of(a)) for a in alone}) > 2  # captions of three different lengths
    width = together.shape[1]
    assert width == max(len(a) for a in alone)
    padded = torch.stack([torch.nn.functional.pad(a, (0, width - len(a))) for a in alone])  # (6, width)
    assert torch.equal(together, padded)
