"""
FAME-ViL: one open_clip CLIP, adapted to several fashion tasks at once.

We never modify open_clip. `FAMEViL` keeps the CLIP module intact and re-runs its two towers
block by block through public attributes (ln_1, attention, ls_1, ln_2, mlp, ls_2), adding, in every
layer of both towers (Eq. 6):

    h  = x + MHSA(LN1(x))                                   # Eq. (2)
    x' = h + MLP(LN2(h)) + TSA_task(h) + eps * XAA(h, y)    # Eq. (6)

Three modes (Fig. 4) set the gate eps per direction (vision reads text, text reads vision):
    contrastive (0, 0)  towers run alone                           -> encode_image, encode_text
    fusion      (1, 1)  lock-step; XAA reads the other tower's h   -> fuse
    generative  (0, 1)  text decoder reads each vision layer's out -> caption_logits, generate
With eps = 0 the XAA is not computed at all.

    python model.py --params [--model ViT-B-16-quickgelu] [--bottleneck 64] [--json]
prints the parameter table (Table 4's #Params analogue) without downloading any weights.
"""
import argparse
import difflib
import json

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import AdaptMLP, CrossAttentionAdapter, ModalityAttention

# mode -> (eps vision<-text, eps text<-vision); a tower gets XAAs only if some task's mode opens its gate
MODES = {"contrastive": (0, 0), "fusion": (1, 1), "generative": (0, 1)}
# the paper's four tasks: name -> (mode, head). Heads: "norm" = learnable-scale L2 norm (retrieval),
# int n = Linear(embed -> n) on the fused feature, "lm" = Linear(text width -> vocab) on text states.
PAPER_TASKS = {"xmr": ("contrastive", "norm"), "tgir": ("fusion", "norm"),
               "scr": ("fusion", 121), "fic": ("generative", "lm")}


def build_clip(name="ViT-B-16-quickgelu", pretrained=None, config=None):
    """An unmodified open_clip CLIP: from a config dict (tests, demo) or by name.

    Only `pretrained` (e.g. 'openai') touches the network. The OpenAI weights need QuickGELU: use
    'ViT-B-16-quickgelu', not 'ViT-B-16' (which would silently change every output).
    """
    if config is not None:
        return open_clip.CLIP(**config)
    known = open_clip.list_models()
    if not name.startswith("hf-hub:") and name not in known:
        hint = difflib.get_close_matches(name, known, n=3)
        suggestion = f"; did you mean {hint}?" if hint else ""
        raise ValueError(f"unknown open_clip model {name!r}{suggestion}")
    return open_clip.create_model(name, pretrained=pretrained or None)


def padding(tokens):  # (B, L) -> (B, L) True after the EOT token (CLIP's largest id, hence argmax)
    return torch.arange(tokens.shape[1], device=tokens.device)[None] > tokens.argmax(-1)[:, None]


def image_size(name, config=None):
    """The input size of a CLIP config dict, or of a built-in open_clip model by name; 224 otherwise
    (an hf-hub config would need the network: built models carry their own `image_size`)."""
    config = config or (open_clip.get_model_config(name) if name in open_clip.list_models() else None) or {}
    return config.get("vision_cfg", {}).get("image_size", 224)


class ScaledNorm(nn.Module):
    """Retrieval head: s * x / |x| with s learnable (init 4), so logits = s^2 cos, temperature 1/16."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        return self.scale * F.normalize(x, dim=-1)


class CMAHead(nn.Module):
    """CMA-CLIP (its Sec. 3.2) as a head on CLIP's token outputs: a sequence-wise transformer over
    [image tokens; text tokens], then per attribute a modality-wise attention over the image's class
    token and the text's EOT token, and an MLP. Returns one logit tensor per attribute."""

    def __init__(self, dim, classes, depth=2, heads=4):  # classes: {attribute: number of classes}
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.sequence = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.modality = nn.ModuleDict({a: ModalityAttention(dim) for a in classes})
        self.mlp = nn.ModuleDict({a: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n))
                                  for a, n in classes.items()})

    def forward(self, image, text, tokens):  # (B, 1 + P, E), (B, L, E), (B, L) -> logits, lambdas
        B, P = image.shape[:2]
        eot = tokens.argmax(-1)
        x = self.sequence(torch.cat([image, text], 1), src_key_padding_mask=F.pad(padding(tokens), (P, 0)))
        i, t = x[:, 0], x[torch.arange(B, device=x.device), P + eot]  # I'_[CLS], T'_[CLS]: (B, E)
        fused = {a: m(i, t) for a, m in self.modality.items()}  # Eq. (3-6): (c, lambda) per attribute
        logits = tuple(self.mlp[a](c) for a, (c, _) in fused.items())  # (B, classes) per attribute
        lambdas = {a: lam for a, (_, lam) in fused.items()}
        return logits, lambdas


class FAMEViL(nn.Module):
    def __init__(self, clip, tasks, bottleneck=64, tsa=True, xaa=True, fusion="add"):
        """clip: an open_clip CLIP. tasks: {name: (mode, head)} as in PAPER_TASKS.
        tsa / xaa switch the adapters off for Table 4's ablation rows; fusion = "add" (the paper's
        plain sum) or "modality" (CMA-CLIP's modality-wise attention, one per fusion task)."""
        super().__init__()
        self.clip = clip
        self.tasks = dict(tasks)
        self.fusion = fusion
        vis, txt = clip.visual, self._text_tower(clip)
        is_vit = isinstance(vis, open_clip.transformer.VisionTransformer)
        if not is_vit or vis.attn_pool is not None or vis.pool_type != "tok":
            raise ValueError("FAME-ViL needs a ViT image tower pooled at its class token")
        L, Lt = len(vis.transformer.resblocks), len(txt.transformer.resblocks)
        if L != Lt:
            raise ValueError(f"FAME-ViL pairs vision layer i with text layer i: the towers must have equal "
                             f"depth, got vision {L} and text {Lt}")
        for name, (mode, head) in self.tasks.items():
            if mode not in MODES or "." in name:
                raise ValueError(f"task {name!r}: mode must be one of {list(MODES)} (got {mode!r})")
        if fusion not in ("add", "modality"):
            raise ValueError(f"fusion must be 'add' or 'modality', got {fusion!r}")
        self.image_size = vis.image_size[0]
        self.context_length = txt.positional_embedding.shape[0]
        dv, dt = vis.transformer.width, txt.transformer.width
        hv = vis.transformer.resblocks[0].attn.num_heads
        ht = txt.transformer.resblocks[0].attn.num_heads
        embed = vis.output_dim

        def per_layer(make):
            return nn.ModuleList(make() for _ in range(L))

        # one TSA set per task in every layer of both towers
        self.tsa = nn.ModuleDict()
        if tsa:
            for tower, d in (("vision", dv), ("text", dt)):
                self.tsa[tower] = nn.ModuleDict({t: per_layer(lambda: AdaptMLP(d, bottleneck))
                                                 for t in self.tasks})
        # one XAA per layer per tower, shared by all tasks; only towers whose gate some mode opens
        gates = [MODES[mode] for mode, _ in self.tasks.values()] if xaa else []
        self.xaa = nn.ModuleDict()
        if any(g[0] for g in gates):  # vision reads text
            self.xaa["vision"] = per_layer(lambda: CrossAttentionAdapter(dv, dt, hv, bottleneck))
        if any(g[1] for g in gates):  # text reads vision
            self.xaa["text"] = per_layer(lambda: CrossAttentionAdapter(dt, dv, ht, bottleneck))
        self.heads = nn.ModuleDict({t: self._make_head(head, embed, dt, txt.vocab_size)
                                    for t, (_, head) in self.tasks.items()})
        self.fusers = nn.ModuleDict({t: ModalityAttention(embed) for t, (mode, _) in self.tasks.items()
                                     if mode == "fusion" and fusion == "modality"})

    @staticmethod
    def _text_tower(clip):  # open_clip's CLIP holds the text tower on itself, CustomTextCLIP in .text
        txt = getattr(clip, "text", clip)
        if not hasattr(txt, "token_embedding") or getattr(txt, "text_pool_type", "argmax") != "argmax":
            raise ValueError("FAME-ViL needs open_clip's own text transformer, pooled at the EOT token")
        return txt

    @staticmethod
    def _make_head(head, embed, text_width, vocab):
        if head == "norm":
            return ScaledNorm()
        if head == "lm":  # untied, with bias (the reference's captioning head)
            return nn.Linear(text_width, vocab)
        if isinstance(head, int):
            return nn.Linear(embed, head)
        # ("cma", {attribute: classes}, depth, heads)
        if isinstance(head, (tuple, list)) and head[0] == "cma":
            return CMAHead(embed, *head[1:])
        raise ValueError(f"unknown head {head!r}")

    def forward(self, fn, *args, **kwargs):
        """Run fn(self, *args): a task's whole computation in one forward, the only way DDP (with
        find_unused_parameters) sees which parameters a step used."""
        return fn(self, *args, **kwargs)

    # ---------------------------------------------------------------- the shared layer loop
    def _check(self, task):
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has tasks {sorted(self.tasks)}")

    def _embed_image(self, images):  # (B, 3, S, S) -> (B, 1 + P, dv), open_clip's vision embed
        v = self.clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, P, dv)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _embed_text(self, tokens):  # (B, L) -> (B, L, dt), causal mask (L, L), padding (B, L)
        txt = self._text_tower(self.clip)
        L = tokens.shape[1]
        context = txt.positional_embedding.shape[0]
        if L > context:
            raise ValueError(f"text of {L} tokens exceeds the model's context of {context}")
        x = txt.token_embedding(tokens) + txt.positional_embedding[:L]
        pad = padding(tokens)  # (B, L)
        return x, txt.attn_mask[:L, :L], pad

    def _adapt(self, tower, task, i, h):  # TSA_task(h) of Eq. (6), or 0 without TSAs
        return self.tsa[tower][task][i](h) if self.tsa else 0

    def _forward(self, task, images=None, tokens=None, gates=(0, 0), memory=None):
        """Both towers in lock-step (either may be None). Returns the final states of each tower
        and the list of every vision layer's output (the generative mode's memory). A `memory` from
        an earlier call replaces the vision tower in generative mode (decoding reuses it)."""
        self._check(task)
        eps_v = gates[0] and "vision" in self.xaa  # a gate opens only where the XAAs exist
        eps_t = gates[1] and "text" in self.xaa
        vblocks = self.clip.visual.transformer.resblocks
        tblocks = self._text_tower(self.clip).transformer.resblocks
        xv = self._embed_image(images) if images is not None else None
        if tokens is not None:
            xt, causal, pad = self._embed_text(tokens)
        outputs = []
        for i, (vb, tb) in enumerate(zip(vblocks, tblocks)):
            hv = xv + vb.ls_1(vb.attention(q_x=vb.ln_1(xv))) if xv is not None else None  # Eq. (2)
            ht = xt + tb.ls_1(tb.attention(q_x=tb.ln_1(xt), attn_mask=causal)) if tokens is not None else None
            if xv is not None:
                extra = self._adapt("vision", task, i, hv)
                if eps_v:  # vision reads the text's h of the same layer, padding masked
                    xaa = self.xaa["vision"][i]
                    extra = extra + xaa(hv, xaa.keys_values(ht), pad)
                xv_new = hv + vb.ls_2(vb.mlp(vb.ln_2(hv))) + extra  # Eq. (6)
                outputs.append(xv_new)
            if tokens is not None:
                extra = self._adapt("text", task, i, ht)
                if eps_t:  # fusion reads vision's h; generative reads the vision layer's output
                    xaa = self.xaa["text"][i]
                    context = hv if gates[0] else memory[i] if memory is not None else xv_new
                    extra = extra + xaa(ht, xaa.keys_values(context))
                xt = ht + tb.ls_2(tb.mlp(tb.ln_2(ht))) + extra
            xv = xv_new if xv is not None else None
        return xv, (xt if tokens is not None else None), outputs

    def _project_image(self, x):  # (..., dv) -> (..., embed): CLIP's final LN and projection
        v = self.clip.visual
        return v.ln_post(x) @ v.proj

    def _project_text(self, x):  # (..., dt) -> (..., embed)
        txt = self._text_tower(self.clip)
        x, proj = txt.ln_final(x), txt.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _pool_image(self, xv):  # (B, 1 + P, dv) -> (B, embed): the class token
        return self._project_image(xv[:, 0])

    def _pool_text(self, xt, tokens):  # (B, L, dt) -> (B, embed): the EOT token
        eot = xt[torch.arange(xt.shape[0], device=xt.device), tokens.argmax(-1)]  # (B, dt)
        return self._project_text(eot)

    # ---------------------------------------------------------------- contrastive mode
    def encode_image(self, images, task):  # (B, 3, S, S) -> (B, embed), unnormalised like CLIP's
        return self._pool_image(self._forward(task, images=images)[0])

    def encode_text(self, tokens, task):  # (B, L) -> (B, embed)
        return self._pool_text(self._forward(task, tokens=tokens)[1], tokens)

    def encode_tokens(self, images, tokens, task):
        """Contrastive mode keeping every token, projected: (B, 1 + P, embed), (B, L, embed).
        CMA-CLIP's sequence-wise attention reads these."""
        xv, xt, _ = self._forward(task, images, tokens)
        return self._project_image(xv), self._project_text(xt)

    # ---------------------------------------------------------------- fusion mode
    def fuse(self, images, tokens, task, eps=1):
        """f([I;T]) + f([T;I]): both towers in lock-step, each XAA reading the other tower's
        post-attention state of the same layer; the pooled features are summed (or weighed by the
        task's modality-wise attention with fusion="modality"). eps=0 gives contrastive features."""
        xv, xt, _ = self._forward(task, images, tokens, gates=(eps, eps))
        image, text = self._pool_image(xv), self._pool_text(xt, tokens)  # (B, embed) each
        if task in self.fusers:
            return self.fusers[task](image, text)[0]
        return image + text

    # ---------------------------------------------------------------- generative mode
    def _lm_task(self, task):
        task = task or next((t for t, (m, _) in self.tasks.items() if m == "generative"), None)
        self._check(task)
        return task

    def caption_states(self, images, tokens, task=None, memory=None):  # -> (B, L, dt) ln_final'd text states
        task = self._lm_task(task)
        _, xt, _ = self._forward(task, None if memory else images, tokens, MODES["generative"], memory)
        return self._text_tower(self.clip).ln_final(xt)

    def caption_logits(self, images, tokens, task=None):
        """Teacher forcing: logits (B, L, vocab); position a predicts token a + 1 (Eq. 11)."""
        task = self._lm_task(task)
        return self.heads[task](self.caption_states(images, tokens, task))

    @torch.no_grad()
    def generate(self, images, max_len=40, beam_size=1, task=None, use_cache=True):
        """Caption images from SOT until EOT or max_len new tokens (never the ground-truth length).

        With use_cache, each step feeds one token: text self-attention keys/values are cached per
        layer and the XAA keys/values of the vision memory are computed once per image. use_cache=False
        recomputes the whole text prefix every step (the reference for tests and bench.py).
        Returns (B, 1 + n) token ids starting with SOT, zero-padded after EOT."""
        task = self._lm_task(task)
        bpe = open_clip.tokenizer._tokenizer
        sot, eot = bpe.sot_token_id, bpe.eot_token_id
        max_len = min(max_len, self.context_length - 1)
        B, K = images.shape[0], beam_size
        _, _, memory = self._forward(task, images=images)  # vision alone, every layer's output
        memory = [m.repeat_interleave(K, 0) for m in memory]  # (B*K, 1 + P, dv) per layer
        kv_image = [x.keys_values(m) for x, m in zip(self.xaa["text"], memory)] if use_cache else None
        seqs = torch.full((B * K, 1), sot, dtype=torch.long, device=images.device)
        score = torch.zeros(B, K, device=images.device)
        score[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        done = torch.zeros(B * K, dtype=torch.bool, device=images.device)
        cache = [None] * len(memory)
        for _ in range(max_len):
            if use_cache:
                state = self._decode_step(task, seqs[:, -1:], cache, kv_image)  # (B*K, dt)
            else:
                state = self.caption_states(None, seqs, task, memory)[:, -1]
            logp = self.heads[task](state).float().log_softmax(-1)  # (B*K, V)
            # a finished beam keeps its score and emits padding (0)
            logp[done] = float("-inf")
            logp[done, 0] = 0
            V = logp.shape[-1]
            total = (score.view(-1, 1) + logp).view(B, K * V)
            score, idx = total.topk(K, dim=-1)  # (B, K)
            parent = (idx // V + torch.arange(B, device=idx.device)[:, None] * K).view(-1)  # (B*K,)
            seqs = torch.cat([seqs[parent], (idx % V).view(-1, 1)], dim=1)
            done = done[parent] | (seqs[:, -1] == eot)
            if use_cache:
                cache = [(k[parent], v[parent]) for k, v in cache]
            if done.all():
                break
        best = score.argmax(-1) + torch.arange(B, device=score.device) * K
        return seqs[best]

    def _decode_step(self, task, token, cache, kv_image):
        """One new token (B, 1) through the text tower with cached self-attention keys/values.
        `cache` is updated in place with each layer's (k, v) of shape (B, heads, n, hd)."""
        txt = self._text_tower(self.clip)
        n = 0 if cache[0] is None else cache[0][0].shape[2]  # tokens already seen = this one's position
        x = txt.token_embedding(token) + txt.positional_embedding[n:n + 1]  # (B, 1, dt)
        for i, blk in enumerate(txt.transformer.resblocks):
            attn = blk.attn  # nn.MultiheadAttention's packed projections, used directly to cache k, v
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, 1, 3 * dt)
            # (B, heads, 1, hd) each
            q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v)  # no mask: every cached token precedes this one
            h = x + blk.ls_1(attn.out_proj(a.transpose(1, 2).flatten(2)))
            extra = self._adapt("text", task, i, h) + self.xaa["text"][i](h, kv_image[i])
            x = h + blk.ls_2(blk.mlp(blk.ln_2(h))) + extra
        return txt.ln_final(x[:, 0])


def from_args(args, pretrained=False):
    """Build a FAMEViL from the model_args every checkpoint stores. Loading a checkpoint needs no
    download (its weights replace CLIP's); pretrained=True fetches open_clip's weights first."""
    weights = args["pretrained"] if pretrained else None
    clip = build_clip(args["model"], weights, args.get("clip_config") or None)
    return FAMEViL(clip, args["tasks"], args["bottleneck"], args["tsa"], args["xaa"], args["fusion"])


def read_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint can never run code when loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e


def from_checkpoint(ckpt):  # a checkpoint dict (read_checkpoint) -> the FAMEViL it holds, no download
    model = from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


def param_table(model):
    """Parameter counts: backbone, one TSA set, XAAs, heads, student total, and the saving against
    one single-task model per task (each = CLIP + its TSA + the XAAs its mode needs + its head)."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    clip = count(model.clip)
    tsa = {t: sum(count(model.tsa[tower][t]) for tower in model.tsa) for t in model.tasks}
    xaa = {tower: count(m) for tower, m in model.xaa.items()}
    # a task's modality-wise attention (fusion="modality") counts as part of its head
    heads = {t: count(h) + (count(model.fusers[t]) if t in model.fusers else 0)
             for t, h in model.heads.items()}
    single = {}
    for t, (mode, _) in model.tasks.items():
        needs = [tw for tw, g in zip(("vision", "text"), MODES[mode]) if g and tw in xaa]
        single[t] = clip + tsa[t] + sum(xaa[tw] for tw in needs) + heads[t]
    total = count(model)
    return dict(clip=clip, tsa_per_task=next(iter(tsa.values()), 0), tsa=tsa, xaa=sum(xaa.values()),
                xaa_per_tower=xaa, heads=heads, total=total, single_task=single,
                single_task_total=sum(single.values()), saving=1 - total / sum(single.values()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", action="store_true", help="print the parameter table")
    p.add_argument("--model", default="ViT-B-16-quickgelu")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.params:
        p.error("nothing to do: pass --params")
    model = FAMEViL(build_clip(args.model, pretrained=None), PAPER_TASKS, args.bottleneck)  # no download
    t = param_table(model)
    if args.json:
        print(json.dumps(t))
        return

    def pct(n):  # share of the CLIP backbone
        return f"{100 * n / t['clip']:8.2f} %"

    print(f"FAME-ViL parameters: {args.model}, bottleneck {args.bottleneck}, tasks {list(PAPER_TASKS)}")
    print(f"  CLIP backbone          {t['clip']:>13,} {pct(t['clip'])}")
    print(f"  TSA, one task          {t['tsa_per_task']:>13,} {pct(t['tsa_per_task'])}")
    for tower, n in t["xaa_per_tower"].items():
        print(f"  XAA, {tower:<6} tower      {n:>13,} {pct(n)}")
    print(f"  XAA, all               {t['xaa']:>13,} {pct(t['xaa'])}")
    for task, n in t["heads"].items():
        print(f"  head {task:<6}            {n:>13,} {pct(n)}")
    print(f"  student total          {t['total']:>13,} {pct(t['total'])}")
    for task, n in t["single_task"].items():
        print(f"  single-task {task:<6}     {n:>13,}")
    print(f"  four single-task total {t['single_task_total']:>13,}")
    print(f"  saving                 {100 * t['saving']:>12.2f} %  (paper, Table 4 row 9: 67.33 %)")


if __name__ == "__main__":
    main()
