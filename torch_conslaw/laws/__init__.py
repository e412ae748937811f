"""What a law IS: pure math, no hooks, no threads, no buffers.

* :mod:`.forms` — the unit / matrix law formulas as quadratic forms and their bilinear forms;
* :mod:`.families` — one module per law family.

Example:
    >>> import torch
    >>> from torch_conslaw import laws
    >>> w1, w2 = torch.ones(3, 4, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    >>> laws.unit_balance(w1, w2.T)
    tensor([2., 2., 2.], dtype=torch.float64)
"""

from .forms import matrix_balance, matrix_balance_bilinear, unit_balance, unit_balance_bilinear

__all__ = ["matrix_balance", "matrix_balance_bilinear", "unit_balance", "unit_balance_bilinear"]
