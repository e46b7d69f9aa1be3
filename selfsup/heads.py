"""Projection heads g(·) (SimCLR §2.1, SimCLRv2 §2) and the MLP blocks they are built from."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

# Normalisation after a Linear: "affine" = BN with γ and β, "scale" = BN with γ only (TF's
# center=False), "none" = BN without any affine parameters, None = no BN.
Norm = Literal["affine", "scale", "none"] | None


class ScaleOnlyBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with a learnable scale γ but no shift β (SimCLR's last head layer, center=False).

    β is removed (``bias = None``) rather than frozen, so no optimiser, weight decay, EMA or
    ``requires_grad_(True)`` can bring it back; ``nn.SyncBatchNorm.convert_sync_batchnorm``
    carries ``bias=None`` over as well.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.bias = None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def _block(in_dim: int, out_dim: int, *, norm: Norm, relu: bool, bias: bool = True,
           activation: Callable[[], nn.Module] = _relu) -> nn.Sequential:
    # A bias before BN is cancelled by the mean subtraction; SimCLR's code drops it too.
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias and norm is None)]
    if norm == "affine":
        layers.append(nn.BatchNorm1d(out_dim))
    elif norm == "scale":
        layers.append(ScaleOnlyBatchNorm1d(out_dim))
    elif norm == "none":
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    elif norm is not None:
        raise ValueError(f"unknown norm {norm!r}; choose from 'affine', 'scale', 'none' or None")
    if relu:
        layers.append(activation())
    return nn.Sequential(*layers)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, batch_norm: bool = True,
        last_norm: Norm = None, bias: bool = True,
        activation: Callable[[], nn.Module] = _relu) -> nn.Sequential:
    """``num_layers`` Linear layers; the middle ones add BN (if ``batch_norm``) and ReLU (or
    ``activation()``: DINO's head uses ``nn.GELU``).

    The last layer has no ReLU and the normalisation ``last_norm``. Examples: BYOL/SimSiam
    predictors ``mlp(d, h, d)``; MoCo v2 head ``mlp(d, d, 128, batch_norm=False)``; SimSiam
    projector ``mlp(d, d, d, 3, last_norm="none")``. Returns a Sequential of per-layer blocks.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    middle = "affine" if batch_norm else None
    blocks = [_block(dims[i], dims[i + 1], norm=middle, relu=True, bias=bias, activation=activation)
              for i in range(num_layers - 1)]
    blocks.append(_block(dims[-2], dims[-1], norm=last_norm, relu=False, bias=bias))
    return nn.Sequential(*blocks)


class ProjectionHead(nn.Module):
    """SimCLR projection MLP g(·) (§2.1; v2: 3 layers, fine-tune from the first).

    As SimCLR's code: middle layers Linear + BN + ReLU, last layer Linear (no bias) + BN with
    scale but no shift, no ReLU. ``batch_norm=False`` gives MoCo v2's head (Linear + ReLU,
    plain Linear last); ``num_layers=1`` a single linear layer (MoCo v1 with ``batch_norm=False``).
    ``bias`` applies to Linear layers without a BN after them.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, num_layers: int = 2, *,
                 batch_norm: bool = True, last_bn: bool = True, bias: bool = True):
        super().__init__()
        last_norm: Norm = "scale" if batch_norm and last_bn else None
        self.layers = mlp(in_dim, hidden_dim, out_dim, num_layers, batch_norm=batch_norm,
                          last_norm=last_norm, bias=bias)
        self.num_layers = num_layers
        self.out_dim = out_dim

    def forward(self, x: Tensor, return_hidden: bool = False) -> Tensor | list[Tensor]:
        """z = g(h); with ``return_hidden``: [h, h_1, ..., z], where h_i is layer i's output."""
        if not return_hidden:
            return self.layers(x)  # (B, out_dim)
        hiddens = [x]  # hiddens[0] = encoder output, SimCLRv2's ft_proj_selector=0
        for layer in self.layers:
            hiddens.append(layer(hiddens[-1]))  # (B, hidden_dim), ..., (B, out_dim)
        return hiddens

    def layers_up_to(self, i: int) -> nn.Sequential:
        """The first ``i`` layers (shared, not copied), to fine-tune from head layer i (SimCLRv2)."""
        if not 0 <= i <= self.num_layers:
            raise ValueError(f"i must be in [0, {self.num_layers}], got {i}")
        return self.layers[:i]
