"""Small demo models, synthetic data and a monitored training loop (used by ``conslaw demo``
and by the experiments).

Example:
    >>> model = make_mlp()
    >>> x, y = regression_data(model, n=32)
    >>> monitor = train(model, x, y, lr=0.05, steps=5)
    >>> monitor.num_steps
    5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .monitor import ConservationMonitor

__all__ = [
    "make_mlp",
    "make_cnn",
    "make_transformer",
    "make_llama_block",
    "regression_data",
    "image_data",
    "sequence_data",
    "make_optimizer",
    "train",
]


def make_mlp(
    widths: tuple[int, ...] = (10, 32, 32, 4),
    activation: Callable[[], nn.Module] = nn.ReLU,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """A fully connected net with ``activation`` after every hidden layer.

    Example:
        >>> len(make_mlp((3, 4, 2)))
        3
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    """conv → σ → max-pool → conv → σ → adaptive avg-pool (2×2) → flatten → linear."""

    def __init__(self, channels: tuple[int, int, int], classes: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.conv1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.act1 = activation()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = activation()
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act1(self.conv1(x)))
        return self.fc(self.flatten(self.gap(self.act2(self.conv2(x)))))


def make_cnn(
    channels: tuple[int, int, int] = (3, 8, 12),
    classes: int = 4,
    activation: Callable[[], nn.Module] = nn.ReLU,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SmallCNN:
    """A two-convolution CNN with a linear head (two channel law groups).

    Example:
        >>> make_cnn().fc.in_features
        48
    """
    torch.manual_seed(seed)
    return SmallCNN(channels, classes, activation).to(dtype)


def make_transformer(
    d_model: int = 16, heads: int = 2, hidden: int = 32, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.TransformerEncoderLayer:
    """One post-norm transformer encoder layer (self-attention, ReLU feed-forward, no dropout):
    per-head attention laws, one law per feed-forward unit, LayerNorm-fed pairs skipped
    because of the residual adds.

    Example:
        >>> make_transformer().self_attn.num_heads
        2
    """
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(
        d_model, heads, dim_feedforward=hidden, dropout=0.0, activation="relu", batch_first=True
    )
    return layer.to(dtype)


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · γ, written out as LLaMA does."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last axis: RoPE pairs i with i + d/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """A LLaMA-style decoder block in plain torch: input projection, RMSNorm → causal
    self-attention with rotary embeddings and grouped-query attention (``kv_heads`` K/V heads
    shared by ``heads`` query heads) → residual, RMSNorm → SwiGLU MLP → residual, final RMSNorm
    → linear head."""

    def __init__(self, d_in: int, d: int, heads: int, kv_heads: int, hidden: int, d_out: int) -> None:
        super().__init__()
        if d % heads or heads % kv_heads or (d // heads) % 2:
            raise ValueError("LlamaBlock: heads must divide d, kv_heads must divide heads, d/heads must be even")
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.embed = nn.Linear(d_in, d)
        self.attn_norm = RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, d_out)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.dh, 2, dtype=torch.float64) / self.dh)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, x: Tensor) -> Tensor:
        t = torch.arange(x.shape[-2], dtype=x.dtype, device=x.device)
        angles = torch.outer(t, self.inv_freq.to(x.dtype))
        angles = torch.cat((angles, angles), dim=-1)
        return x * angles.cos() + rotate_half(x) * angles.sin()

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.embed(x)
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv, self.dh).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv, self.dh).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        groups = self.h // self.kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, n, -1))
        h = self.mlp_norm(x)
        x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.head(self.norm(x))


def make_llama_block(
    d_in: int = 8, d: int = 16, heads: int = 4, kv_heads: int = 2, hidden: int = 24, d_out: int = 4,
    seed: int = 0, dtype: torch.dtype = torch.float64,
) -> LlamaBlock:
    """A small :class:`LlamaBlock`: RoPE-plane laws and V/O laws per K/V group, RMSNorm → q/k/v
    and → gate/up, SwiGLU up → down, final norm → head (found from the op graph, so pass an
    example input to the monitor).

    Example:
        >>> make_llama_block().k_proj.out_features
        8
    """
    torch.manual_seed(seed)
    return LlamaBlock(d_in, d, heads, kv_heads, hidden, d_out).to(dtype)


def sequence_data(
    model: nn.Module, n: int = 32, length: int = 6, seed: int = 1, noise: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Gaussian token sequences ``(n, length, d_model)`` for a batch-first sequence model and
    targets from a random teacher of the same architecture plus noise."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    dtype = first.weight.dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, first.in_features, generator=g, dtype=dtype)
    with torch.no_grad():
        teacher = {
            k: torch.randn(p.shape, generator=g, dtype=dtype) * p.detach().std().nan_to_num(0.1)
            for k, p in model.named_parameters()
        }
        out = torch.func.functional_call(model, teacher, (x,))
    return x, out + noise * torch.randn(out.shape, generator=g, dtype=dtype)


def regression_data(model: nn.Module, n: int = 128, seed: int = 1, noise: float = 0.5) -> tuple[Tensor, Tensor]:
    """Gaussian inputs for the first ``Linear`` layer of ``model`` and targets from a random
    teacher of the same architecture plus noise (so the loss does not vanish)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    dtype = first.weight.dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, first.in_features, generator=g, dtype=dtype)
    with torch.no_grad():
        teacher = [  # a random teacher at the scale of the model's own initialization
            torch.randn(p.shape, generator=g, dtype=dtype) * p.detach().std().nan_to_num(0.1)
            for p in model.parameters()
        ]
        out = torch.func.functional_call(model, dict(zip((k for k, _ in model.named_parameters()), teacher)), (x,))
    return x, out + noise * torch.randn(out.shape, generator=g, dtype=dtype)


def image_data(model: nn.Module, n: int = 64, size: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random images for the first ``Conv2d`` of ``model`` and random class labels."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    out = next(m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, first.in_channels, size, size, generator=g, dtype=first.weight.dtype)
    return x, torch.randint(0, out.out_features, (n,), generator=g)


def make_optimizer(
    model: nn.Module, name: str = "sgd", lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (with optional momentum / weight decay) or ``adam``.

    Example:
        >>> type(make_optimizer(make_mlp((2, 2)), "adam")).__name__
        'Adam'
    """
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"make_optimizer: unknown optimizer {name!r}; use 'sgd' or 'adam'")


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    **monitor_kwargs: Any,
) -> ConservationMonitor:
    """Full-batch training (MSE for float targets, cross-entropy for class labels) with a
    :class:`ConservationMonitor` attached; returns the monitor. The demo's figures show every
    step: ``every=1`` unless ``monitor_kwargs`` choose a schedule."""
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    if not {"every", "log_spaced", "overhead_budget"} & monitor_kwargs.keys():
        monitor_kwargs["every"] = 1
    monitor = ConservationMonitor(model, **monitor_kwargs).attach(opt)
    loss_fn = nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return monitor
