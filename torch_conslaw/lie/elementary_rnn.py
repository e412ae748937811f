"""Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells) through elementary ops.

The fused ATen kernels behind them (``torch.gru``, ``torch.lstm``, ``torch.rnn_tanh``,
``torch.rnn_relu``, ``torch.lstm_cell``) have no ``torch.func.vmap`` batching rule, and the
count of laws evaluates the model at a stack of parameter points under vmap. While counting,
:class:`~torch_conslaw.lie.elementary.ElementaryOps` reroutes them to the loops below, which
compute the same recurrences (PyTorch's gate order and layouts: r, z, n for the GRU; i, f, g,
o for the LSTM; weights of layer l and direction d at ``params[(l · dirs + d) · stride:]``)
with matmuls and pointwise ops. Dropout between layers is off, as everywhere in the count.

Packed sequences (``nn.utils.rnn.PackedSequence``) are not rerouted: :func:`full_sequence`
raises a ``NotImplementedError`` that says so.

Example:
    >>> import torch
    >>> gru = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True).double()
    >>> x = torch.randn(5, 2, 3, dtype=torch.float64)
    >>> out, h = gru(x)
    >>> mine, h_mine = gru_sequence(x, torch.zeros(4, 2, 4, dtype=torch.float64),
    ...                             gru._flat_weights, True, 2, 0.0, False, True, False)
    >>> bool(torch.allclose(out, mine) and torch.allclose(h, h_mine))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["REROUTES", "gru_sequence", "lstm_sequence", "rnn_tanh_sequence", "rnn_relu_sequence"]

Cell = Callable[[Tensor, Any, Sequence[Tensor | None]], tuple[Tensor, Any]]


def _gates(x: Tensor, h: Tensor, w: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
    gi = x @ w[0].T if w[2] is None else x @ w[0].T + w[2]
    gh = h @ w[1].T if w[3] is None else h @ w[1].T + w[3]
    return gi, gh


def _rnn_cell(activation: Callable[[Tensor], Tensor]) -> Cell:
    def cell(x: Tensor, h: Tensor, w: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
        gi, gh = _gates(x, h, w)
        h = activation(gi + gh)
        return h, h

    return cell


def _gru_cell(x: Tensor, h: Tensor, w: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
    gi, gh = _gates(x, h, w)
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


def _lstm_cell(x: Tensor, state: tuple[Tensor, Tensor], w: Sequence[Tensor | None]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    h, c = state
    gi, gh = _gates(x, h, w)
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if len(w) > 4 and w[4] is not None:  # proj_size > 0: h = W_hr (o ⊙ tanh c)
        h = h @ w[4].T
    return h, (h, c)


def _layer_weights(params: Sequence[Tensor], has_biases: bool, layers: int, dirs: int) -> list[list[Tensor | None]]:
    stride, rest = divmod(len(params), layers * dirs)
    if rest or stride < (4 if has_biases else 2):
        raise ValueError(f"{len(params)} recurrent weights do not split into {layers} layers × {dirs} directions")
    out = []
    for k in range(layers * dirs):
        w = list(params[k * stride : (k + 1) * stride])
        if not has_biases:
            w = w[:2] + [None, None] + w[2:]
        out.append(w)
    return out


def _run(
    cell: Cell,
    x: Tensor,
    states: list[Any],
    params: Sequence[Tensor],
    has_biases: bool,
    layers: int,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[Tensor, list[Any]]:
    """The stacked (bi)directional recurrence; ``states[l · dirs + d]`` is the initial state."""
    dirs = 2 if bidirectional else 1
    weights = _layer_weights(params, has_biases, layers, dirs)
    seq = x.transpose(0, 1) if batch_first else x  # (T, B, F)
    finals: list[Any] = []
    for layer in range(layers):
        outputs = []
        for d in range(dirs):
            k = layer * dirs + d
            state, steps = states[k], []
            order = range(seq.shape[0]) if d == 0 else range(seq.shape[0] - 1, -1, -1)
            for t in order:
                y, state = cell(seq[t], state, weights[k])
                steps.append(y)
            if d == 1:
                steps.reverse()
            outputs.append(torch.stack(steps))
            finals.append(state)
        seq = torch.cat(outputs, -1) if dirs == 2 else outputs[0]
    return (seq.transpose(0, 1) if batch_first else seq), finals


def full_sequence(cell: Cell) -> Callable[..., tuple[Tensor, Tensor]]:
    """``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu`` on a padded batch, elementary."""

    def call(
        input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int,
        dropout: float, train: bool, bidirectional: bool, batch_first: bool,
    ) -> tuple[Tensor, Tensor]:
        if not isinstance(params, (list, tuple)):
            raise NotImplementedError("packed sequences (PackedSequence) are not supported while counting laws; pass a padded batch")
        out, finals = _run(cell, input, list(hx.unbind(0)), params, has_biases, num_layers, bidirectional, batch_first)
        return out, torch.stack(finals)

    return call


gru_sequence = full_sequence(_gru_cell)
rnn_tanh_sequence = full_sequence(_rnn_cell(torch.tanh))
rnn_relu_sequence = full_sequence(_rnn_cell(torch.relu))


def lstm_sequence(
    input: Tensor, hx: Sequence[Tensor], params: Sequence[Tensor], has_biases: bool, num_layers: int,
    dropout: float, train: bool, bidirectional: bool, batch_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.lstm`` on a padded batch, elementary (with ``proj_size``)."""
    if isinstance(hx, Tensor):  # (data, batch_sizes, hx, params, ...): a PackedSequence
        raise NotImplementedError("packed sequences (PackedSequence) are not supported while counting laws; pass a padded batch")
    h0, c0 = hx
    states = list(zip(h0.unbind(0), c0.unbind(0)))
    out, finals = _run(_lstm_cell, input, states, params, has_biases, num_layers, bidirectional, batch_first)
    return out, torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals])


def _cell_call(cell: Cell) -> Callable[..., Any]:
    def call(input: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Any:
        return cell(input, hx, [w_ih, w_hh, b_ih, b_hh])[1]

    return call


REROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.gru: gru_sequence,
    torch.lstm: lstm_sequence,
    torch.rnn_tanh: rnn_tanh_sequence,
    torch.rnn_relu: rnn_relu_sequence,
    torch.gru_cell: _cell_call(_gru_cell),
    torch.lstm_cell: _cell_call(_lstm_cell),
    torch.rnn_tanh_cell: _cell_call(_rnn_cell(torch.tanh)),
    torch.rnn_relu_cell: _cell_call(_rnn_cell(torch.relu)),
}
"""ATen recurrent functions → their elementary versions (merged into ElementaryOps' table)."""
