"""
FAME-ViL: one open_clip CLIP, adapted to several fashion tasks at once.

References
  FAME-ViL: Multi-Tasking Vision-Language Model for Heterogeneous Fashion Tasks. Han, Zhu, Yu, Zhang, Song,
      Xiang. CVPR 2023. https://arxiv.org/abs/2303.02483 (equation numbers below are this paper's)
  The authors' code (an MMF fork on HuggingFace CLIP): https://github.com/BrandonHanx/FAME-ViL
  CMA-CLIP: Cross-Modality Attention CLIP for Image-Text Classification. Liu et al. 2021.
      https://arxiv.org/abs/2112.03562 (CMAHead below, and adapters.ModalityAttention)
  open_clip: https://github.com/mlfoundations/open_clip

We never modify open_clip. `FAMEViL.forward` keeps the CLIP module intact and re-runs its two towers block by
block through public attributes (ln_1, attention, ls_1, ln_2, mlp, ls_2), layer i of vision beside layer i of
text, for the task t of the call:
    z_0 = Embedding(x)                                           Eq. (1)   _embed_image, _embed_text
    h   = z + MHSA(LN1(z))                                       Eq. (2)   _attend
    z'  = h + MLP(LN2(h)) + TSA_t(h) + eps XAA(h, y)             Eq. (6)   _adapted (Eq. 3 plus two terms)
Three modes (Fig. 4, `MODES`) say what each tower's XAA reads as y; where a mode gives it nothing, eps = 0 and
the XAA is not computed at all.

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

CLIP_MODEL = "ViT-B-16-quickgelu"  # the paper's backbone; OpenAI's weights need QuickGELU
SOT, EOT = 49406, 49407  # CLIP's start and end of text; EOT is the largest id of its vocabulary, padding is 0
# Fig. 4 as data: in each mode, what each tower's XAA reads (None: its gate eps is 0).
#   "h"       the other tower's post-attention state h of the same layer (both towers in lock-step)
#   "output"  the vision tower's output of the same layer (its layer-wise memory; the vision tower goes first)
# A tower gets XAAs only if some task's mode gives them something to read.
MODES = {
    "contrastive": dict(vision=None, text=None),  # each tower alone: XMR, the TGIR target
    "fusion": dict(vision="h", text="h"),  # f([I;T]) + f([T;I]): SCR, the TGIR query
    "generative": dict(vision=None, text="output"),  # a captioning decoder reading every vision layer: FIC
}


def build_clip(name=CLIP_MODEL, pretrained=None, config=None):
    """An unmodified open_clip CLIP: from a config dict (tests, the toy) or by name; its weights from
    `pretrained`: an open_clip tag (e.g. 'openai': the only network access of this project) or a checkpoint
    file (downloaded by hand, or pretrain.py's), loaded by open_clip's own load_checkpoint either way. The
    OpenAI weights need QuickGELU: use 'ViT-B-16-quickgelu', not 'ViT-B-16' (which would silently change every
    output)."""
    if config is None:
        return open_clip.create_model(known_name(name), pretrained=pretrained or None)
    clip = open_clip.CLIP(**config)
    if pretrained:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"--pretrained {pretrained}: with --clip_config, a checkpoint file (python "
                                    f"pretrain.py writes the toy CLIP's) or --pretrained '' for random weights")
        open_clip.load_checkpoint(clip, pretrained)
    return clip


def known_name(name):  # an open_clip model name, or a ValueError that suggests the closest ones
    known = open_clip.list_models()
    if not name.startswith("hf-hub:") and name not in known:
        hint = difflib.get_close_matches(name, known, n=3)
        suggestion = f"; did you mean {hint}?" if hint else ""
        raise ValueError(f"unknown open_clip model {name!r}{suggestion}")
    return name


def eot_position(tokens):  # (B, L) -> (B,): EOT is the largest id, so argmax; a text is pooled there
    return tokens.argmax(-1)


def padding(tokens):  # (B, L) -> (B, L) True after the EOT token
    return torch.arange(tokens.shape[1], device=tokens.device)[None] > eot_position(tokens)[:, None]


def image_size(name, config=None):
    """The input size of a CLIP config dict or a built-in open_clip model; else 224 (an hf-hub config would
    need the network). Never silently wrong: another size fails at the positional embedding."""
    if not config and known_name(name) in open_clip.list_models():  # no config dict: the model's own
        config = open_clip.get_model_config(name)
    return (config or {}).get("vision_cfg", {}).get("image_size", 224)


class ScaledNorm(nn.Module):
    """Retrieval head: s * x / |x| with s learnable (init 4), so logits = s^2 cos: CLIP's temperature of
    Eq. (8) starts at 1/16."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        return self.scale * F.normalize(x, dim=-1)


class CMAHead(nn.Module):
    """CMA-CLIP (its Sec. 3.2) as a head on CLIP's token outputs: a sequence-wise transformer over
    [image tokens; text tokens], then per attribute a modality-wise attention over the image's class
    token and the text's EOT token, and an MLP. Returns one logit tensor per attribute.
    At init every modality-wise attention weighs the two tokens equally (lambda = 0.5); the transformer and
    the MLPs keep PyTorch's defaults, and nn.TransformerEncoder deep-copies its layer, so its `depth` layers
    start as identical copies (they part as training feeds them different inputs)."""

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
        # CMA-CLIP's Eq. (3-6): c = lambda I' + (1 - lambda) T' per attribute (protocols.py hooks lambda)
        return tuple(self.mlp[a](m(i, t)[0]) for a, m in self.modality.items())


def make_head(head, embed, text_width, vocab):
    """A task's head from its spec: "norm" (retrieval), "lm" (captioning: untied, with bias, as the
    authors' captioning head), an int n (a linear classifier over n classes on the fused feature), or
    ("cma", {attribute: classes}, depth, heads) (CMA-CLIP). Linear layers keep PyTorch's default init."""
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
            if MODES[mode]["text"] == "output" and not xaa:  # a decoder: no XAA, no image
                raise ValueError(f"task {name!r} is {mode}: its captioner reads the image only through the "
                                 f"text-side XAA, so it cannot be trained with xaa off (--xaa false)")
        for mode, reads in MODES.items():  # forward runs the vision tower first: it cannot read text outputs
            if reads["vision"] not in (None, "h") or reads["text"] not in (None, "h", "output"):
                raise ValueError(f"MODES[{mode!r}] = {reads}: vision may read 'h', text 'h' or 'output'")
        if fusion not in ("add", "modality"):
            raise ValueError(f"fusion must be 'add' or 'modality', got {fusion!r}")
        self.depth, self.image_size = depth_v, vis.image_size[0]
        self.context_length = self.text.positional_embedding.shape[0]
        width = dict(vision=vis.transformer.width, text=self.text.transformer.width)
        heads = dict(vision=vis.transformer.resblocks[0].attn.num_heads,
                     text=self.text.transformer.resblocks[0].attn.num_heads)
        embed = vis.output_dim

        def per_layer(module, *args):  # one module per layer
            return nn.ModuleList(module(*args) for _ in range(self.depth))

        # one TSA set per task in every layer of both towers
        self.tsa = nn.ModuleDict()
        if tsa:
            for tower in ("vision", "text"):
                self.tsa[tower] = nn.ModuleDict({t: per_layer(AdaptMLP, width[tower], bottleneck)
                                                 for t in self.tasks})
        # one XAA per layer per tower, shared by all tasks; only towers that some task's mode lets read
        self.xaa = nn.ModuleDict()
        for tower, other in (("vision", "text"), ("text", "vision")):
            if xaa and any(MODES[mode][tower] for mode, _ in self.tasks.values()):
                self.xaa[tower] = per_layer(CrossAttentionAdapter, width[tower], width[other], heads[tower],
                                            bottleneck)
        self.heads = nn.ModuleDict({t: make_head(head, embed, width["text"], self.text.vocab_size)
                                    for t, (_, head) in self.tasks.items()})
        self.fusers = nn.ModuleDict({t: ModalityAttention(embed) for t, (mode, _) in self.tasks.items()
                                     if mode == "fusion" and fusion == "modality"})

    @property
    def text(self):  # the text tower: open_clip's CLIP holds it on itself, CustomTextCLIP in .text
        txt = getattr(self.clip, "text", self.clip)
        if not hasattr(txt, "token_embedding") or getattr(txt, "text_pool_type", "argmax") != "argmax":
            raise ValueError("FAME-ViL needs open_clip's own text transformer, pooled at the EOT token")
        return txt

    def forward(self, task, mode, images=None, tokens=None):
        """Both towers through every layer in lock-step, in one of Fig. 4's modes, with the task's TSAs;
        either input may be None (that tower does not run). Returns the final states (B, P, Dv) and
        (B, L, Dt), and per layer what the vision tower offered the text tower's XAA (the generative mode's
        memory, which decoding reads)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has tasks {sorted(self.tasks)}")
        reads = MODES[mode]
        xv = None if images is None else self._embed_image(images)
        xt, causal, pad = (None, None, None) if tokens is None else self._embed_text(tokens)
        memory, blocks = [], zip(self.clip.visual.transformer.resblocks, self.text.transformer.resblocks)
        for i, (bv, bt) in enumerate(blocks):
            hv, ht = self._attend(bv, xv), self._attend(bt, xt, causal)
            # what each XAA reads: the vision tower goes first, so the text may read its output of this layer
            xv = self._adapted(bv, hv, "vision", task, i, {"h": ht}.get(reads["vision"]), pad)
            offer = {"h": hv, "output": xv}.get(reads["text"])
            xt = self._adapted(bt, ht, "text", task, i, offer)
            memory.append(offer)
        return xv, xt, memory

    # ---------------------------------------------------------------- one layer
    def _attend(self, block, x, mask=None):  # Eq. (2): h = x + MHSA(LN1(x)); None if the tower is not running
        return None if x is None else x + block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=mask))

    def _attend_cached(self, block, x, cache, i):
        """_attend for the newest token(s) x while decoding: their keys/values join layer i's cached ones in
        cache[i] (B, H, n, d) and they attend to all of them (every cached token precedes them: no mask)."""
        attn = block.attn  # nn.MultiheadAttention's packed projections, used directly to keep k and v
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, 1, 3D)
        q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
        if cache[i] is not None:
            k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
        cache[i] = (k, v)
        a = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (B, 1, D)
        return x + block.ls_1(a)

    def _adapted(self, block, h, tower, task, i, y=None, pad=None):
        """z' = h + MLP(LN2(h)) + TSA_task(h) + eps XAA(h, y), Eq. (6): eps = 1 iff there is a state y of the
        other tower to read (and the model has this tower's XAAs). pad masks y's padding (text keys)."""
        if h is None:  # this tower is not running
            return None
        adapters = self.tsa[tower][task][i](h) if self.tsa else 0
        if y is not None and tower in self.xaa:
            adapters = adapters + self.xaa[tower][i](h, y, pad)
        return h + block.ls_2(block.mlp(block.ln_2(h))) + adapters

    def _embed_image(self, images):  # Eq. (1), open_clip's vision embed: (B, 3, S, S) -> (B, P, Dv)
        v = self.clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, P - 1, Dv)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _embed_text(self, tokens, start=0):
        """Eq. (1) for (B, L) ids at positions start..: embeddings (B, L, Dt), causal mask (L, L), padding
        (B, L)."""
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
        return self._project_image(self(task, "contrastive", images=images)[0][:, 0])

    def encode_text(self, tokens, task):  # (B, L) -> (B, E)
        return self._pool_text(self(task, "contrastive", tokens=tokens)[1], tokens)

    def encode_tokens(self, images, tokens, task):
        """Contrastive mode keeping every token, projected: (B, P, E), (B, L, E). CMA-CLIP's
        sequence-wise attention reads these."""
        xv, xt, _ = self(task, "contrastive", images, tokens)
        return self._project_image(xv), self._project_text(xt)

    # ---------------------------------------------------------------- fusion mode
    def fuse(self, images, tokens, task):
        """f([I;T]) + f([T;I]): both towers in lock-step, each XAA reading the other tower's post-attention
        state of the same layer; the pooled features are summed (or weighed by the task's modality-wise
        attention with fusion="modality"). (B, 3, S, S), (B, L) -> (B, E). At init (fresh XAAs add 0) it is
        exactly encode_image + encode_text (with fusion="modality": their mean)."""
        xv, xt, _ = self(task, "fusion", images, tokens)
        image, text = self._project_image(xv[:, 0]), self._pool_text(xt, tokens)  # (B, E) each
        if task in self.fusers:
            return self.fusers[task](image, text)[0]
        return image + text

    # ---------------------------------------------------------------- generative mode
    def caption_states(self, images, tokens, task):
        """Teacher forcing: the text tower as a causal decoder reading the vision tower's layer-wise memory;
        its final states after ln_final, (B, L, Dt). The head maps position a to a prediction of token
        a + 1 (Eq. 11). At init (fresh XAAs add 0) these are the text tower's own states: the image is
        learnt, not given."""
        return self.text.ln_final(self(task, "generative", images, tokens)[1])

    def _decode(self, tokens, task, memory, cache=None):
        """The text tower alone as the decoder: layer i's XAA reads memory[i], what the vision tower offered
        it (or that state's XAA keys/values). With a `cache`, tokens are only the newest ones, placed after
        the cached positions. -> the states after ln_final, (B, L, Dt)"""
        start = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]  # tokens already cached
        x, causal, _ = self._embed_text(tokens, start)
        for i, block in enumerate(self.text.transformer.resblocks):
            h = self._attend(block, x, causal) if cache is None else self._attend_cached(block, x, cache, i)
            x = self._adapted(block, h, "text", task, i, memory[i])
        return self.text.ln_final(x)

    @torch.no_grad()
    def generate(self, images, task, max_len=40, beam_size=1, use_cache=True):
        """Caption images from SOT until EOT or max_len new tokens (never the ground-truth length).

        With use_cache, each step feeds one token: text self-attention keys/values are cached per
        layer and the XAA keys/values of the vision memory are computed once per image. use_cache=False
        recomputes the whole text prefix every step (the reference for tests and bench.py). A beam's score is
        the plain sum of its tokens' log-probabilities (no length penalty); a finished beam keeps its score.
        Returns (B, 1 + n) token ids starting with SOT, zero-padded after EOT."""
        max_len = min(max_len, self.context_length - 1)
        B, K = images.shape[0], beam_size
        memory = self(task, "generative", images=images)[2]  # vision tower alone: what each text layer reads
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
            state = self._decode(fed, task, memory, cache)[:, -1]  # (B*K, Dt)
            live = (~done).nonzero()[:, 0]  # (n,) only unfinished beams pay for the vocabulary
            logits = self.heads[task](state[live]).float()  # (n, V)
            V = logits.shape[-1]
            logp = torch.full((B * K, V), float("-inf"), device=images.device)  # (B*K, V)
            logp[done, 0] = 0  # a finished beam keeps its score and emits padding (0)
            # greedy needs only each row's argmax, which the logits share with the log-probabilities
            logp[live] = logits.log_softmax(-1) if K > 1 else logits
            total = (score.view(-1, 1) + logp).view(B, K * V)
            score, idx = total.topk(K, dim=-1) if K > 1 else total.max(-1, keepdim=True)  # (B, K)
            parent = (idx // V + torch.arange(B, device=idx.device)[:, None] * K).view(-1)  # (B*K,)
            seqs = torch.cat([seqs[parent], (idx % V).view(-1, 1)], dim=1)
            done = done[parent] | (seqs[:, -1] == EOT)
            if use_cache:
                cache = [(k[parent], v[parent]) for k, v in cache]
            if done.all():
                break
        return seqs.view(B, K, -1)[:, 0]  # topk sorts: slot 0 holds each image's best beam


# ---------------------------------------------------------------- checkpoints: read, build
def read_checkpoint(path, fix="train one first, e.g. python train.py --preset demo"):
    """A checkpoint file -> its dict, with torch.load(weights_only=True): loading can never run code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there ({fix})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e


def build(args, pretrained=False):
    """A FAMEViL from the model_args every checkpoint stores. Loading a checkpoint needs no download (its
    weights replace CLIP's); pretrained=True loads open_clip's weights first (the start of a run)."""
    weights = args["pretrained"] if pretrained else None
    clip = build_clip(args["model"], weights, args.get("clip_config") or None)
    return FAMEViL(clip, args["tasks"], args["bottleneck"], args["tsa"], args["xaa"], args["fusion"])


def from_checkpoint(ckpt):  # a checkpoint dict (read_checkpoint) -> the FAMEViL it holds, no download
    model = build(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model
