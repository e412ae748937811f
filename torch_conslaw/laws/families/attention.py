"""Attention: the laws that the score product q·k and the value → output path leave.

Scores of head h are q_h k_hᵀ with q = X W_Q + b_Q, k = X W_K + b_K (any implementation:
fused ``c_attn``, separate projections, eager ``matmul`` + softmax, SDPA). Write Q̃_h for the
d_h rows of W_Q of head h with the bias appended as a column (rows = coordinates of the head).

* **q·k** — W̃_Q,h → M W̃_Q,h and W̃_K,h → M^(−T) W̃_K,h leave every score unchanged:
  the matrix law Q̃_h Q̃_hᵀ − K̃_h K̃_hᵀ (d_h(d_h+1)/2 entries).
* **V/O** — W̃_V,h → M W̃_V,h and the head's columns of W_O → · M^(−1): Ṽ_h Ṽ_hᵀ − O_hᵀ O_h.
* **grouped-query / multi-query** — one M per K/V head g, shared by its query heads G_g:
  Σ_{h∈G_g} Q̃_h Q̃_hᵀ − K̃_g K̃_gᵀ and Ṽ_g Ṽ_gᵀ − Σ_{h∈G_g} O_hᵀ O_h. A per-head law would
  be false here.
* **rotary embeddings** — only M commuting with every position's rotation survives: per
  rotated 2-plane a rotation-scaling. The rotation gives no quadratic law, the scaling gives
  ‖q-rows of the plane‖² − ‖k-rows of the plane‖² per head and plane (summed over G_g with
  grouped queries). The pairing of coordinates into planes is read from the ops (HF LLaMA's
  ``rotate_half`` pairs i with i + d_h/2).
* scaling by 1/sqrt(d_h), masks, dropout on the probabilities and additive score biases keep
  these laws: they act on the scores, not on q or k separately.

All are quadratic forms built from the row readers of
:mod:`torch_conslaw.laws.families.rescaling`: a matrix law with the query blocks as
"incoming" rows and the key blocks as "outgoing" rows (concatenated blocks sum their Gram
matrices), or a unit law with degree 1 over the rows of each plane.

Example:
    >>> import torch
    >>> from torch_conslaw import laws
    >>> q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    >>> m = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    >>> x = torch.randn(5, 8, dtype=torch.float64)
    >>> scores = (x @ q.T) @ (x @ k.T).T
    >>> moved = (x @ (m @ q).T) @ (x @ (torch.linalg.inv(m).T @ k).T).T
    >>> bool(torch.allclose(scores, moved))
    True
    >>> laws.matrix_balance(q, k).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

__all__: list[str] = []
