"""Low-rank surrogate Â = U S Vᵀ ≈ A(θ) with orthonormal U (m×r), V (n×r) and S (r×r)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astraora.errors import ConfigError
from astraora.ledger import QueryLedger


def truncated_svd(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-r factors of a (m, n): U (m, r), S = diag(σ) (r, r), V (n, r)."""
    u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], torch.diag(sigma[:rank]), vh[:rank].transpose(0, 1)


def best_rank_error(a: Tensor, rank: int) -> float:
    """‖A − A_r‖_F / ‖A‖_F for the truncated SVD A_r."""
    sigma = torch.linalg.svdvals(a.double())
    return float(sigma[rank:].norm() / sigma.norm().clamp_min(1e-300))


class LowRankSurrogate(nn.Module):
    """Â = U S Vᵀ; carries input gradients through the device: ∂L/∂X ≈ G Â = ((G U) S) Vᵀ.

    Buffers (checkpointed): ``U`` (m, r), ``S`` (r, r), ``V`` (n, r), ``theta_ref`` (the θ the
    factors were last synchronised to, i.e. θ₀ of the next integrator update) and ``initialized``.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, theta_shape: tuple[int, ...], *, layer: str = "layer"):
        super().__init__()
        if not 1 <= int(rank) <= min(d_in, d_out):
            raise ConfigError(
                f"surrogate.rank={rank} is not allowed for physical layer {layer!r} ({d_in} -> {d_out}); "
                f"it must be between 1 and min(d_in, d_out)={min(d_in, d_out)}."
            )
        self.rank = int(rank)
        self.register_buffer("U", torch.zeros(d_out, rank))
        self.register_buffer("S", torch.zeros(rank, rank))
        self.register_buffer("V", torch.zeros(d_in, rank))
        self.register_buffer("theta_ref", torch.zeros(theta_shape))
        self.register_buffer("initialized", torch.tensor(False))

    def matrix(self) -> Tensor:
        """Â (m, n)."""
        return self.U @ self.S @ self.V.T

    def input_grad(self, g: Tensor) -> Tensor:
        """G Â for upstream gradients G (B, m) → (B, n), never forming Â."""
        return ((g @ self.U) @ self.S) @ self.V.T

    def apply(self, x: Tensor) -> Tensor:
        """x Âᵀ (B, n) → (B, m), for the health residual."""
        return ((x @ self.V) @ self.S.T) @ self.U.T

    @torch.no_grad()
    def set_factors(self, u: Tensor, s: Tensor, v: Tensor, theta: Tensor) -> None:
        self.U.copy_(u)
        self.S.copy_(s)
        self.V.copy_(v)
        self.theta_ref.copy_(theta.detach())
        self.initialized.fill_(True)

    @torch.no_grad()
    def readout(self, ledger: QueryLedger) -> None:
        """Read A(θ) out with n queries (the identity) and keep its truncated rank-r SVD."""
        theta = ledger.device.theta.detach()
        a = ledger.read_matrix("readout").to(self.U.dtype)  # (m, n); kept for colored differences
        self.set_factors(*truncated_svd(a, self.rank), theta)

    @torch.no_grad()
    def orthonormality_error(self) -> float:
        """max(‖UᵀU − I‖_max, ‖VᵀV − I‖_max): how far the factors are from orthonormal."""
        eye = torch.eye(self.rank, dtype=self.U.dtype, device=self.U.device)
        return float(max((self.U.T @ self.U - eye).abs().max(), (self.V.T @ self.V - eye).abs().max()))
