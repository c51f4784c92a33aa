"""The LQF optimum by a direct solve in function space, with exact leave-one-out.

The objective (lqf.py, isotropic regularizer)
    L(dw) = 1/(2N) Σ_i ||f0_i + J_i dw - Y_i||² + λ/2 ||dw||²
has the unique optimum  dw* = Jᵀ α,  (K + NλI) α = r,  with K = J Jᵀ the N·C × N·C
Gram matrix (gram.py) and r = Y - f0. One Cholesky factor of K + NλI gives:
- the optimum, to round-off (then refined against the exact matrix-free products);
- the training residuals  e = r - K α = Nλ α;
- every item's exact leave-one-out residual, the classical ridge / GP identity
      Y_i - f_{-i}(z_i) = B_ii⁻¹ α_i,   B = (K + NλI)⁻¹,  B_ii its C×C diagonal block,
  with the prior strength Nλ held fixed (docs/method.md, "Leave-one-out convention").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DualFactor:
    """The Cholesky factor of K + NλI for one weight decay λ."""

    chol: torch.Tensor  # lower triangular, (N C, N C)
    num_items: int
    num_outputs: int
    weight_decay: float

    @classmethod
    def factor(cls, gram: torch.Tensor, num_items: int, weight_decay: float) -> DualFactor:
        """Factor K + NλI. `gram` is shifted in place and restored (no second copy)."""
        shift = num_items * weight_decay
        gram.diagonal().add_(shift)
        try:
            chol = torch.linalg.cholesky(gram)
        finally:
            gram.diagonal().sub_(shift)
        return cls(chol, num_items, gram.shape[0] // num_items, weight_decay)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """(K + NλI)⁻¹ rhs for rhs (N, C) -> (N, C)."""
        flat = rhs.reshape(-1, 1).to(self.chol.dtype)
        return torch.cholesky_solve(flat, self.chol).reshape(rhs.shape)

    def diagonal_blocks(self) -> torch.Tensor:
        """The C×C diagonal blocks of (K + NλI)⁻¹, (N, C, C): from L⁻¹, since
        B = L⁻ᵀ L⁻¹ makes B_ii the Gram matrix of L⁻¹'s columns of item i."""
        eye = torch.eye(self.chol.shape[0], dtype=self.chol.dtype, device=self.chol.device)
        inverse = torch.linalg.solve_triangular(self.chol, eye, upper=False)
        del eye
        cols = inverse.view(-1, self.num_items, self.num_outputs)
        return torch.einsum("mnc,mnd->ncd", cols, cols)

    def loo_residuals(self, alpha: torch.Tensor,
                      blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Y_i - f_{-i}(z_i) for every training item i, (N, C)."""
        blocks = self.diagonal_blocks() if blocks is None else blocks
        return torch.linalg.solve(blocks, alpha.to(blocks.dtype).unsqueeze(-1)).squeeze(-1)
