"""VICReg (Bardes et al., 2022): variance-invariance-covariance regularisation. Two views'
embeddings are pulled together (MSE), each dimension's standard deviation over the batch is held
above 1 by a hinge, and the dimensions are decorrelated (VICReg §3, eq. 6; main_vicreg.py).

As the official code: the expander is Linear-BN-ReLU layers and a last Linear without bias
(8192-8192-8192 on ImageNet), each view runs through the networks alone, the views are BYOL's
pair, and the variance and covariance are over the global batch (:func:`selfsup.losses.vicreg`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError
from ..heads import mlp
from ..losses import vicreg
from .base import TwoViewMethod


class VICReg(TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int, sim_coeff: float,
                 std_coeff: float, cov_coeff: float, **shared: Any):
        """dim, hidden_dim (None: the backbone's width), layers: the expander; sim_coeff λ,
        std_coeff μ, cov_coeff ν: the weights of the invariance, variance and covariance terms."""
        super().__init__(backbone, **shared)
        self.projector = mlp(backbone.num_features, hidden_dim or backbone.num_features, dim, layers, bias=False)
        self.coeffs = dict(sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "VICReg":
        m, c = cfg.model, cfg.vicreg
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers, sim_coeff=c.sim_coeff,
                   std_coeff=c.std_coeff, cov_coeff=c.cov_coeff, **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        TwoViewMethod.check(cfg)
        c = cfg.vicreg
        if c.sim_coeff == c.std_coeff == c.cov_coeff == 0:
            raise ConfigError("vicreg.sim_coeff, vicreg.std_coeff and vicreg.cov_coeff are all 0: the loss would "
                              "always be zero; give at least one a positive weight (VICReg's: 25, 25 and 1)")

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        z1, z2 = self.project(views)  # (N, D) each, BN per view
        return {"loss": vicreg(z1, z2, **self.coeffs), "embedding": torch.cat([z1, z2])}
