"""Models for the op-graph law tests and experiments/graph_laws_table.py: tiny Hugging Face
models built from configs (no downloads) and CIFAR ResNet-18 / VGG-11-BN in plain torch.

Each factory takes the attention implementation (``eager`` / ``sdpa``; ignored by the CNNs)
and returns (model, example input, output picker, laws that exist). The last is an
independent by-hand count from the config of the exact laws of the rescaling, gated,
norm-affine and attention families (SCIENCE.md §5, §8).
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

F64 = torch.float64


def tri(n: int) -> int:
    return n * (n + 1) // 2


def _ids(vocab: int = 50) -> dict:
    return {"input_ids": torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))}


def gpt2(impl: str):
    cfg = _tf().GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = impl
    # per layer: q·k and V/O per head, ln_1 → c_attn, ln_2 → c_fc (GELU ends c_fc; ln_f → lm_head is tied)
    expected = 2 * (4 * 2 * tri(8) + 32 + 32)
    return _tf().GPT2LMHeadModel(cfg), _ids(), lambda o: o.logits, expected


def llama(impl: str):
    cfg = _tf().LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                   max_position_embeddings=32)
    cfg._attn_implementation = impl
    # per layer: RoPE planes per K/V group (d_h / 2 each), V/O per K/V group, input norm → q/k/v,
    # post-attention norm → gate/up, SwiGLU up → down; final norm → lm_head (untied)
    expected = 2 * (2 * 4 + 2 * tri(8) + 32 + 32 + 48) + 32
    return _tf().LlamaForCausalLM(cfg), _ids(), lambda o: o.logits, expected


def bert(impl: str):
    cfg = _tf().BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=50, max_position_embeddings=32,
                                  num_labels=3)
    cfg._attn_implementation = impl
    # post-norm: per layer q·k and V/O per head; the last LayerNorm → pooler through [CLS]
    expected = 2 * 4 * 2 * tri(8) + 32
    return _tf().BertForSequenceClassification(cfg), _ids(), lambda o: o.logits, expected


def distilbert(impl: str):
    cfg = _tf().DistilBertConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, vocab_size=50,
                                        max_position_embeddings=32, num_labels=3)
    cfg._attn_implementation = impl
    # heads; last LayerNorm → pre_classifier ([CLS]); pre_classifier → ReLU → classifier
    expected = 2 * 4 * 2 * tri(8) + 32 + 32
    return _tf().DistilBertForSequenceClassification(cfg), _ids(), lambda o: o.logits, expected


def vit(impl: str):
    cfg = _tf().ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=16, patch_size=8, num_labels=3)
    cfg._attn_implementation = impl
    # pre-norm: heads, layernorm_before → q/k/v, layernorm_after → fc1; final norm → classifier ([CLS])
    expected = 2 * (4 * 2 * tri(8) + 32 + 32) + 32
    x = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)}
    return _tf().ViTForImageClassification(cfg), x, lambda o: o.logits, expected


def t5(impl: str):
    cfg = _tf().T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=50)
    cfg._attn_implementation = impl
    # heads (relative position bias on the scores keeps them), T5LayerNorm → q/k/v and → wi,
    # wi → ReLU → wo; the final norm is the output
    expected = 2 * (4 * 2 * tri(8) + 32 + 32 + 48)
    return _tf().T5EncoderModel(cfg), _ids(), lambda o: o.last_hidden_state, expected


def _tf():
    import transformers

    return transformers


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks)."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(impl: str = "-"):
    model = ResNet18(width=8)
    # bn1 of every block → ReLU → conv2: one channel law per channel; and the residual stream of
    # each stage (ICML 2025): its channel c is written by the stem's BatchNorm (or the stage's
    # downsampling shortcut BatchNorm) and every block's bn2, read by every block's conv1, the
    # next stage's shortcut conv or the head: one law per stream channel of each stage
    expected = 2 * (8 + 16 + 32 + 64) + (8 + 16 + 32 + 64)
    return model, torch.randn(2, 3, 32, 32, dtype=F64), lambda y: y, expected


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11_bn(impl: str = "-", scale: int = 8):
    layers: list[nn.Module] = []
    cin, bns = 3, []
    for v in VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c = int(v) // scale
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=False)]
        bns.append(c)
        cin = c
    hidden = 512 // scale
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin, hidden), nn.ReLU(), nn.Dropout(),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, 10))
    # every BatchNorm → ReLU (→ max-pool) → the next conv / the first Linear; two hidden Linear layers
    expected = sum(bns) + 2 * hidden
    return model, torch.randn(2, 3, 32, 32, dtype=F64), lambda y: y, expected


def build(factory, impl):
    torch.manual_seed(0)
    model, example, pick, expected = factory(impl)
    return model.double(), example, pick, expected


# ------------------------------------------------------------------ linear and approximate laws, by hand
def linear_laws(model: nn.Module, impl: str, train: bool) -> int:
    """Linear (zero-gradient) laws that exist, counted by hand from the config (SCIENCE.md §8):
    key biases, LayerNorm centering (column sums + bias sum of a layer, row sums of an embedding
    table, whose output reaches only a LayerNorm over the features), padding rows, biases right
    before a BatchNorm. ``train``: dropout is active (it ends centering across it) and
    BatchNorm uses batch statistics (the bias law needs them)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind == "gpt2":
        # key third of c_attn's bias per layer; pre-norm: the residual stream is read only by
        # LayerNorms (ln_1, ln_2 of every layer, ln_f), so every layer writing into it keeps its
        # centering laws: attn.c_proj and mlp.c_proj (columns + bias sum) and the row sums of wpe
        # (dropout before every add in train mode); wte is tied to lm_head (no centering, no
        # wte−wpe translation: lm_head reads wte too)
        key = cfg.n_layer * cfg.n_embd
        inner = cfg.n_inner or 4 * cfg.n_embd
        return key if train else key + cfg.n_layer * ((cfg.n_embd + 1) + (inner + 1)) + cfg.n_positions
    if kind in ("bert", "distilbert"):
        # post-norm: per layer the key bias and LN(x + dense(h)) after the attention output and
        # the FFN output (columns + bias sum; dropout before the add in train mode, except
        # DistilBERT's attention output, which has none); the embeddings reach only their
        # LayerNorm: row sums of every table (the padding row counted entry by entry instead)
        layers, hidden, inner = ((cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) if kind == "bert"
                                 else (cfg.n_layers, cfg.dim, cfg.hidden_dim))
        dense = (hidden + 1) + (inner + 1)
        if train:
            dense = (hidden + 1) if kind == "distilbert" else 0
        tables = (cfg.vocab_size - 1) + cfg.max_position_embeddings + getattr(cfg, "type_vocab_size", 0)
        # the token-type and position tables are only added (to each other and the words): moving
        # one by c and the other by −c is a translation law per feature (dropout comes after the
        # LayerNorm); the word table has a padding_idx, so it has none
        translation = hidden if kind == "bert" else 0
        return layers * (hidden + dense) + hidden + tables + translation
    if kind == "vit":
        # key bias (eager computes the softmax in float32: not exact in float64, so not counted);
        # pre-norm: the residual stream is read only by LayerNorms, so the attention output
        # dense and the fc2 of every layer keep their centering laws (columns + bias sum); the
        # [CLS] token and the position embeddings are added into that stream: their row sums
        # (1 + patches + 1; the embeddings' dropout comes after them in train mode)
        key = cfg.num_hidden_layers * cfg.hidden_size if impl == "sdpa" else 0
        # and the patch convolution, whose channels become the features: Σ_out W[out] per
        # (channel, i, j) and Σ b
        tokens = 0 if train else 1 + (cfg.image_size // cfg.patch_size) ** 2 + 1 + cfg.num_channels * cfg.patch_size ** 2 + 1
        # translations between terms added at the same positions (before the dropout, so in train
        # mode too): cls_token − position row 0, and the patch bias − Σ position rows 1..N, one
        # per feature each (their feature sums repeat row sums above: 2·hidden − 2 independent)
        translation = 2 * cfg.hidden_size
        return key + cfg.num_hidden_layers * ((cfg.hidden_size + 1) + (cfg.intermediate_size + 1)) + tokens + translation
    if kind == "t5":
        # no biases, RMS norms (no mean subtracted), no padding_idx; the relative position bias
        # table (one column per head, shared by every layer) is added into the scores before the
        # softmax over the keys: its column sums
        return cfg.num_heads
    if kind == "llama":
        return 0  # no biases, RMS norms (no mean subtracted), no padding_idx
    if isinstance(model, ResNet18):
        # convolutions without bias; a downsampling block adds bn2(·) and its shortcut BatchNorm
        # and only then applies ReLU: the two β shift the sum alike (parallel biases), β_bn2 − β_shortcut
        # per channel (batch or running statistics alike)
        return sum(b.bn2.num_features for b in model.layers if len(b.shortcut))
    # VGG-11-BN: the bias of every conv right before its BatchNorm (batch statistics: train mode)
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) if train else 0


def approximate_laws(model: nn.Module) -> int:
    """Approximate laws (scale invariance, exact only at eps = 0) that exist, by hand: one per
    normalized group of a layer whose output reaches nothing but the normalization."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("bert", "distilbert"):
        return 1  # the word + position (+ type) embeddings jointly, before the embeddings' LayerNorm
    if kind is not None:
        return 0  # every other norm reads a residual stream
    # CNNs: every convolution right before a BatchNorm, per channel
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
