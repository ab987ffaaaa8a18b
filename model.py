"""
FAME-ViL: one open_clip CLIP, adapted to several fashion tasks at once.

References
  FAME-ViL: Multi-Tasking Vision-Language Model for Heterogeneous Fashion Tasks. Han, Zhu, Yu, Zhang, Song,
      Xiang. CVPR 2023. https://arxiv.org/abs/2303.02483 (equation numbers below are this paper's)
  The authors' code (an MMF fork on HuggingFace CLIP): https://github.com/BrandonHanx/FAME-ViL
  CMA-CLIP: Cross-Modality Attention CLIP for Image-Text Classification. Liu et al. 2021.
      https://arxiv.org/abs/2112.03562 (CMAHead below, and adapters.ModalityAttention)
  open_clip: https://github.com/mlfoundations/open_clip

We never modify open_clip. `FAMEViL` keeps the CLIP module intact and re-runs its two towers block by
block through public attributes (ln_1, attention, ls_1, ln_2, mlp, ls_2); `_layer` is one layer of both
towers for the task t of the call: h = x + MHSA(LN1(x)), x' = h + MLP(LN2(h)) + TSA_t(h) + eps XAA(h, y)
(the paper's Eq. 2 and 6). Three modes (Fig. 4) open the gate eps per direction (vision<-text, text<-vision):
    contrastive (0, 0)  towers run alone                                -> encode_image, encode_text
    fusion      (1, 1)  lock-step; each XAA reads the other tower's h   -> fuse
    generative  (0, 1)  the text decoder reads each vision layer's out  -> caption_logits, generate
With eps = 0 the XAA is not computed at all.

Shapes: B batch, P image tokens (patches + the class token), L text tokens, M tokens of the other tower
(an XAA's keys/values), Dv / Dt vision / text width, E joint embedding width, H heads, d = D / H head
width, V vocabulary, K beam size, C classes.
"""
import difflib
import os

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import AdaptMLP, CrossAttentionAdapter, ModalityAttention

# a tiny CLIP with the real tokenizer's vocabulary: builds in milliseconds (the tests, bench.py --quick)
TINY_CLIP = dict(embed_dim=32, quick_gelu=True,
                 vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2))
SOT, EOT = 49406, 49407  # CLIP's start and end of text; EOT is the largest id of its vocabulary, padding is 0
# mode -> (eps vision<-text, eps text<-vision); a tower gets XAAs only if some task's mode opens its gate
MODES = {"contrastive": (0, 0), "fusion": (1, 1), "generative": (0, 1)}


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


def eot_position(tokens):  # (B, L) -> (B,): EOT is the largest id, so argmax; a text is pooled there
    return tokens.argmax(-1)


def padding(tokens):  # (B, L) -> (B, L) True after the EOT token
    return torch.arange(tokens.shape[1], device=tokens.device)[None] > eot_position(tokens)[:, None]


def image_size(name, config=None):
    """The input size of a CLIP config dict or a built-in open_clip model; else 224 (an hf-hub config would
    need the network). Never silently wrong: another size fails at the positional embedding."""
    if config is None and name in open_clip.list_models():
        config = open_clip.get_model_config(name)
    return (config or {}).get("vision_cfg", {}).get("image_size", 224)


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

    def forward(self, image, text, tokens):  # (B, P, E), (B, L, E), (B, L) -> a (B, C) logits per attribute
        B, P = image.shape[:2]
        x = self.sequence(torch.cat([image, text], 1), src_key_padding_mask=F.pad(padding(tokens), (P, 0)))
        t = x[torch.arange(B, device=x.device), P + eot_position(tokens)]  # T'_[CLS]: (B, E)
        i = x[:, 0]  # I'_[CLS]: (B, E)
        # Eq. (3-6) of CMA-CLIP: c = lambda I' + (1 - lambda) T' per attribute (protocols.py hooks lambda)
        return tuple(self.mlp[a](m(i, t)[0]) for a, m in self.modality.items())


def make_head(head, embed, text_width, vocab):
    """A task's head from its spec: "norm" (retrieval), "lm" (captioning: untied, with bias, as the
    authors' captioning head), an int n (a linear classifier over n classes on the fused feature), or
    ("cma", {attribute: classes}, depth, heads) (CMA-CLIP)."""
    if head == "norm":
        return ScaledNorm()
    if head == "lm":
        return nn.Linear(text_width, vocab)
    if isinstance(head, int):
        return nn.Linear(embed, head)
    if isinstance(head, (tuple, list)) and head[0] == "cma":
        return CMAHead(embed, *head[1:])
    raise ValueError(f"unknown head {head!r}")


class FAMEViL(nn.Module):
    def __init__(self, clip, tasks, bottleneck=64, tsa=True, xaa=True, fusion="add"):
        """clip: an open_clip CLIP. tasks: {name: (mode, head spec)} (tasks.model_tasks builds it).
        tsa / xaa switch the adapters off for Table 4's ablation rows; fusion = "add" (the paper's
        plain sum) or "modality" (CMA-CLIP's modality-wise attention, one per fusion task)."""
        super().__init__()
        self.clip, self.tasks, self.fusion = clip, dict(tasks), fusion
        vis = clip.visual
        is_vit = isinstance(vis, open_clip.transformer.VisionTransformer)
        if not is_vit or vis.attn_pool is not None or vis.pool_type != "tok":
            raise ValueError("FAME-ViL needs a ViT image tower pooled at its class token")
        depth_v, depth_t = len(vis.transformer.resblocks), len(self.text.transformer.resblocks)
        if depth_v != depth_t:
            raise ValueError(f"FAME-ViL pairs vision layer i with text layer i: the towers must have equal "
                             f"depth, got vision {depth_v} and text {depth_t}")
        for name, (mode, _) in self.tasks.items():
            if mode not in MODES or "." in name:
                raise ValueError(f"task {name!r}: mode must be one of {list(MODES)} (got {mode!r})")
            if mode == "generative" and not xaa:
                raise ValueError(f"task {name!r} is generative: its captioner reads the image only through "
                                 f"the text-side XAA, so it cannot be trained with xaa off (--xaa false)")
        if fusion not in ("add", "modality"):
            raise ValueError(f"fusion must be 'add' or 'modality', got {fusion!r}")
        self.depth, self.image_size = depth_v, vis.image_size[0]
        self.context_length = self.text.positional_embedding.shape[0]
        width_v, width_t = vis.transformer.width, self.text.transformer.width
        heads_v = vis.transformer.resblocks[0].attn.num_heads
        heads_t = self.text.transformer.resblocks[0].attn.num_heads
        embed = vis.output_dim

        def per_layer(module, *args):  # one module per layer
            return nn.ModuleList(module(*args) for _ in range(self.depth))

        # one TSA set per task in every layer of both towers
        self.tsa = nn.ModuleDict()
        if tsa:
            for tower, width in (("vision", width_v), ("text", width_t)):
                self.tsa[tower] = nn.ModuleDict({t: per_layer(AdaptMLP, width, bottleneck)
                                                 for t in self.tasks})
        # one XAA per layer per tower, shared by all tasks; only towers whose gate some mode opens
        gates = [MODES[mode] for mode, _ in self.tasks.values()] if xaa else []
        self.xaa = nn.ModuleDict()
        if any(g[0] for g in gates):  # vision reads text
            self.xaa["vision"] = per_layer(CrossAttentionAdapter, width_v, width_t, heads_v, bottleneck)
        if any(g[1] for g in gates):  # text reads vision
            self.xaa["text"] = per_layer(CrossAttentionAdapter, width_t, width_v, heads_t, bottleneck)
        self.heads = nn.ModuleDict({t: make_head(head, embed, width_t, self.text.vocab_size)
                                    for t, (_, head) in self.tasks.items()})
        self.fusers = nn.ModuleDict({t: ModalityAttention(embed) for t, (mode, _) in self.tasks.items()
                                     if mode == "fusion" and fusion == "modality"})

    @property
    def text(self):  # the text tower: open_clip's CLIP holds it on itself, CustomTextCLIP in .text
        txt = getattr(self.clip, "text", self.clip)
        if not hasattr(txt, "token_embedding") or getattr(txt, "text_pool_type", "argmax") != "argmax":
            raise ValueError("FAME-ViL needs open_clip's own text transformer, pooled at the EOT token")
        return txt

    def forward(self, fn, *args, **kwargs):
        """Run fn(self, *args): a task's whole computation in one forward, the only way DDP (with
        find_unused_parameters) sees which parameters a step used."""
        return fn(self, *args, **kwargs)

    # ---------------------------------------------------------------- one layer, Eq. (2) and (6)
    def _attend(self, block, x, mask=None, cache=None, i=0):
        """h = x + MHSA(LN1(x)), Eq. (2), through open_clip's block. With a decoding `cache` (one (k, v)
        per layer), x holds only the newest token: its keys/values join layer i's cached ones and it
        attends to all of them (every cached token precedes it, so no mask)."""
        if cache is None:
            a = block.attention(q_x=block.ln_1(x), attn_mask=mask)  # (B, L, D)
        else:
            attn = block.attn  # nn.MultiheadAttention's packed projections, used directly to keep k, v
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, 1, 3D)
            q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
            if cache[i] is not None:  # (B, H, n, d) each
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
            a = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (B, 1, D)
        return x + block.ls_1(a)

    def _adapted(self, block, h, tower, task, i, read=None, pad=None):
        """x' = h + MLP(LN2(h)) + [TSA_task(h) + eps XAA(h, y)], Eq. (6): eps = 1 iff the mode gave this
        tower's XAA a state y to `read` (and the model has XAAs). pad masks y's padding (text keys)."""
        if h is None:  # this tower is not running
            return None
        adapters = self.tsa[tower][task][i](h) if self.tsa else 0
        if read is not None and tower in self.xaa:
            adapters = adapters + self.xaa[tower][i](h, read, pad)
        return h + block.ls_2(block.mlp(block.ln_2(h))) + adapters

    def _layer(self, i, task, mode, xv, xt, causal=None, pad=None, memory=None, cache=None):
        """Layer i of both towers in lock-step; either stream may be None. `memory`: when decoding, what
        the text reads instead of a vision tower running beside it (every vision layer's output, or
        those outputs' XAA keys/values); `cache`: the decoder's self-attention keys/values."""
        blocks_v, blocks_t = self.clip.visual.transformer.resblocks, self.text.transformer.resblocks
        hv = ht = None
        if xv is not None:
            hv = self._attend(blocks_v[i], xv)
        if xt is not None:
            ht = self._attend(blocks_t[i], xt, causal, cache, i)
        # Fig. 4: what each XAA reads, decided here and nowhere else (no `read`: eps = 0)
        if mode == "fusion":  # each tower reads the other's h of this same layer
            xv = self._adapted(blocks_v[i], hv, "vision", task, i, read=ht, pad=pad)
            xt = self._adapted(blocks_t[i], ht, "text", task, i, read=hv)
        elif mode == "generative":  # the text reads vision layer i's output: just computed, or the memory
            xv = self._adapted(blocks_v[i], hv, "vision", task, i)
            xt = self._adapted(blocks_t[i], ht, "text", task, i, read=xv if memory is None else memory[i])
        else:  # contrastive: each tower alone
            xv = self._adapted(blocks_v[i], hv, "vision", task, i)
            xt = self._adapted(blocks_t[i], ht, "text", task, i)
        return xv, xt

    def _run(self, task, mode, images=None, tokens=None, memory=None, cache=None):
        """Both towers through every layer (either input may be None). Returns the final states of each
        tower and the list of every vision layer's output (the generative mode's memory)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has tasks {sorted(self.tasks)}")
        xv = self._embed_image(images) if images is not None else None
        xt = causal = pad = None
        if tokens is not None:
            start = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]  # tokens already cached
            xt, causal, pad = self._embed_text(tokens, start)
        outputs = []
        for i in range(self.depth):
            xv, xt = self._layer(i, task, mode, xv, xt, causal, pad, memory, cache)
            outputs.append(xv)
        return xv, xt, outputs

    def _embed_image(self, images):  # (B, 3, S, S) -> (B, P, Dv), open_clip's vision embed
        v = self.clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, P - 1, Dv)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _embed_text(self, tokens, start=0):
        """(B, L) ids at positions start.. -> embeddings (B, L, Dt), causal mask (L, L), padding (B, L)."""
        L, context = tokens.shape[1], self.context_length
        if start + L > context:
            raise ValueError(f"text of {start + L} tokens exceeds the model's context of {context}")
        x = self.text.token_embedding(tokens) + self.text.positional_embedding[start:start + L]
        return x, self.text.attn_mask[:L, :L], padding(tokens)

    def _project_image(self, x):  # (..., Dv) -> (..., E): CLIP's final LN and projection
        v = self.clip.visual
        return v.ln_post(x) @ v.proj

    def _project_text(self, x):  # (..., Dt) -> (..., E)
        x, proj = self.text.ln_final(x), self.text.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _pool_text(self, xt, tokens):  # (B, L, Dt) -> (B, E): the EOT token
        return self._project_text(xt[torch.arange(xt.shape[0], device=xt.device), eot_position(tokens)])

    # ---------------------------------------------------------------- contrastive mode
    def encode_image(self, images, task):  # (B, 3, S, S) -> (B, E), unnormalised like CLIP's
        return self._project_image(self._run(task, "contrastive", images=images)[0][:, 0])

    def encode_text(self, tokens, task):  # (B, L) -> (B, E)
        return self._pool_text(self._run(task, "contrastive", tokens=tokens)[1], tokens)

    def encode_tokens(self, images, tokens, task):
        """Contrastive mode keeping every token, projected: (B, P, E), (B, L, E). CMA-CLIP's
        sequence-wise attention reads these."""
        xv, xt, _ = self._run(task, "contrastive", images, tokens)
        return self._project_image(xv), self._project_text(xt)

    # ---------------------------------------------------------------- fusion mode
    def fuse(self, images, tokens, task, eps=1):
        """f([I;T]) + f([T;I]): both towers in lock-step, each XAA reading the other tower's
        post-attention state of the same layer; the pooled features are summed (or weighed by the
        task's modality-wise attention with fusion="modality"). eps=0 gives contrastive features."""
        xv, xt, _ = self._run(task, "fusion" if eps else "contrastive", images, tokens)
        image, text = self._project_image(xv[:, 0]), self._pool_text(xt, tokens)  # (B, E) each
        if task in self.fusers:
            return self.fusers[task](image, text)[0]
        return image + text

    # ---------------------------------------------------------------- generative mode
    def caption_states(self, images, tokens, task, memory=None, cache=None):
        """The decoder's final text states after ln_final, (B, L, Dt): the vision tower runs with the
        task's TSA and no XAA, and text layer i reads vision layer i's output. Decoding passes `memory`
        instead of images (and a `cache`, tokens then being only the newest one)."""
        xt = self._run(task, "generative", images, tokens, memory, cache)[1]
        return self.text.ln_final(xt)

    def caption_logits(self, images, tokens, task):
        """Teacher forcing: logits (B, L, V); position a predicts token a + 1 (Eq. 11)."""
        return self.heads[task](self.caption_states(images, tokens, task))

    @torch.no_grad()
    def generate(self, images, task, max_len=40, beam_size=1, use_cache=True):
        """Caption images from SOT until EOT or max_len new tokens (never the ground-truth length).

        With use_cache, each step feeds one token: text self-attention keys/values are cached per
        layer and the XAA keys/values of the vision memory are computed once per image. use_cache=False
        recomputes the whole text prefix every step (the reference for tests and bench.py).
        Returns (B, 1 + n) token ids starting with SOT, zero-padded after EOT."""
        max_len = min(max_len, self.context_length - 1)
        B, K = images.shape[0], beam_size
        memory = self._run(task, "generative", images=images)[2]  # vision alone, every layer's output
        memory = [m.repeat_interleave(K, 0) for m in memory]  # (B*K, P, Dv) per layer
        cache = None
        if use_cache:
            memory = [x.keys_values(m) for x, m in zip(self.xaa["text"], memory)]
            cache = [None] * self.depth
        seqs = torch.full((B * K, 1), SOT, dtype=torch.long, device=images.device)
        score = torch.zeros(B, K, device=images.device)
        score[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        done = torch.zeros(B * K, dtype=torch.bool, device=images.device)
        for _ in range(max_len):
            fed = seqs[:, -1:] if use_cache else seqs  # the newest token, or the whole prefix again
            state = self.caption_states(None, fed, task, memory, cache)[:, -1]  # (B*K, Dt)
            logp = self.heads[task](state).float().log_softmax(-1)  # (B*K, V)
            # a finished beam keeps its score and emits padding (0)
            logp[done] = float("-inf")
            logp[done, 0] = 0
            V = logp.shape[-1]
            total = (score.view(-1, 1) + logp).view(B, K * V)
            score, idx = total.topk(K, dim=-1)  # (B, K)
            parent = (idx // V + torch.arange(B, device=idx.device)[:, None] * K).view(-1)  # (B*K,)
            seqs = torch.cat([seqs[parent], (idx % V).view(-1, 1)], dim=1)
            done = done[parent] | (seqs[:, -1] == EOT)
            if use_cache:
                cache = [(k[parent], v[parent]) for k, v in cache]
            if done.all():
                break
        best = score.argmax(-1) + torch.arange(B, device=score.device) * K
        return seqs[best]


def from_args(args, pretrained=False):
    """Build a FAMEViL from the model_args every checkpoint stores. Loading a checkpoint needs no
    download (its weights replace CLIP's); pretrained=True fetches open_clip's weights first."""
    weights = args["pretrained"] if pretrained else None
    clip = build_clip(args["model"], weights, args.get("clip_config") or None)
    return FAMEViL(clip, args["tasks"], args["bottleneck"], args["tsa"], args["xaa"], args["fusion"])


def read_checkpoint(path, fix="train one first, e.g. python train.py --preset demo"):
    """torch.load with weights_only=True: a checkpoint can never run code when loaded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there ({fix})")
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
