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
    :class:`ConservationMonitor` attached; returns the monitor."""
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    monitor = ConservationMonitor(model, **monitor_kwargs).attach(opt)
    loss_fn = nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return monitor
