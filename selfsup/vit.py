"""Vision Transformer encoders (Dosovitskiy et al. 2021) as self-supervised methods train them:
DINO's ``vision_transformer.py`` (Caron et al. 2021) and MoCo v3 (Chen et al. 2021).

``forward`` maps (B, 3, S, S) to the [CLS] token after the final LayerNorm, (B, num_features).
Parameter names and shapes are timm's ``VisionTransformer`` (its defaults in timm 1.0.31: one
class token, no register tokens, learned position embeddings that include the class position,
no pre-norm, no ``fc_norm`` for token pooling), so ``state_dict()`` loads into
``timm.create_model("vit_small_patch16_224", num_classes=0)`` with ``strict=True`` and gives the
same features; other grids load with ``img_size=`` and ``patch_size=`` (``export.py``).

The position embeddings are learned for a G×G grid, G = ``img_size // patch_size``. Another
input side runs through the same network with the patch part resampled bicubically to its grid
(:func:`resample_pos_embed`, DINO's ``interpolate_pos_encoding``), so multi-crop's local crops
(96 px beside 224 px globals, 16 px beside 32 px) share the encoder.

Stochastic depth (:class:`DropPath`) rises linearly over the blocks to ``drop_path``; a momentum
teacher runs without it (:func:`without_drop_path`). ``freeze_patch_embed`` is MoCo v3's fix
for training instability (§4.2): a random patch projection that never trains.
``grad_checkpointing`` keeps only each block's input for backward and recomputes the block's
activations there (``torch.utils.checkpoint``): less memory, about one more forward of time.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .conv import Conv2d

#: name -> (embedding width D, attention heads); all have 12 blocks (DeiT's tiny and small, ViT-B)
VIT_SIZES: dict[str, tuple[int, int]] = {
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}
DEPTH = 12
LN_EPS = 1e-6  # timm's and DINO's LayerNorm eps, not torch's 1e-5


class DropPath(nn.Module):
    """A residual connection with stochastic depth (Huang et al. 2016): ``x + branch(x)``, where in
    train mode the branch is dropped for some samples and scaled by B / (samples kept) for the
    others, so the expectation is x + branch(x).

    Default (DINO's and timm's ``drop_path``): each sample is kept with probability 1 - p (a
    Bernoulli count) and the branch runs on the whole batch, multiplied by the 0/1 mask.
    ``subset``: exactly ``keep = round(B (1 - p))`` samples (at least 1), a uniformly random
    subset drawn by ``randperm``, go through the branch, which then costs keep/B of the compute;
    the count is fixed, so there is no host sync and the shapes are static (a compiled forward is
    built once). Each sample is still kept with probability keep/B ≈ 1 - p; where B p < 1/2
    (small batches, the early blocks' low rates) nothing is dropped. Both draw from torch's
    global RNG, so a seeded run repeats (and activation checkpointing replays the draw).
    """

    def __init__(self, drop_prob: float = 0.0, subset: bool = False):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.subset = subset

    def forward(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """x: (B, ...) -> x + branch(x), the branch dropped per sample (train mode)."""
        if not self.training or self.drop_prob == 0.0:
            return x + branch(x)
        b = x.shape[0]
        if self.subset:
            keep = max(1, round(b * (1.0 - self.drop_prob)))
            kept = torch.randperm(b, device=x.device)[:keep]  # (keep,)
            return x.index_add(0, kept, branch(x[kept]).to(x.dtype), alpha=b / keep)  # (B, ...)
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((b,) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, 1)
        return x + branch(x) * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}" + (", subset=True" if self.subset else "")


def without_drop_path(module: nn.Module) -> nn.Module:
    """Set every :class:`DropPath` in ``module`` to ``drop_prob`` 0, in place, and return
    ``module``: DINO's teacher is the student's architecture without stochastic depth."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module


def resample_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + G², D) position embeddings -> (1, 1 + grid², D): the class position as it is, the
    G×G patch part resized bicubically (``align_corners=False``, no antialiasing, as DINO). The
    same tensor when ``grid`` is G."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if grid == side:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, G², D)
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, dim)  # (1, g², D)
    return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + g², D)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches, each linearly projected to D: a conv with kernel = stride = p."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h != w:
            raise ValueError(f"a ViT takes square images; got {h}x{w} (H x W)")
        if h % p:
            raise ValueError(f"image side {h} is not a multiple of the ViT's patch size {p}; crop or resize "
                             f"the views to a multiple of {p} (e.g. {max(p, h // p * p)})")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h/p, w/p) -> (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention: one Linear for q, k and v, softmax(q kᵀ / √d) v per head."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    """Linear to ``hidden``, exact GELU, Linear back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D) -> (B, N, hidden) -> (B, N, D)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each branch dropped
    as a whole by stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, drop_path_subset: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path, drop_path_subset)  # no parameters: the state dict stays timm's

    def attention_branch(self, x: Tensor) -> Tensor:
        return self.attn(self.norm1(x))  # (b, N, D)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))  # (b, N, D)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop_path(x, self.attention_branch)  # (B, N, D)
        return self.drop_path(x, self.mlp_branch)


class VisionTransformer(nn.Module):
    """ViT trunk without a classifier; ``forward`` maps (B, 3, S, S), S a multiple of
    ``patch_size``, to the final-normed [CLS] token (B, num_features).

    ``img_size``: the side the position embeddings are learned for (other sides resample them).
    ``drop_path``: block i drops its branches with probability ``drop_path * i / (depth - 1)``.
    ``drop_path_subset``: run each dropped branch on a fixed-size random subset of the batch
    (:class:`DropPath`) instead of masking it.
    ``freeze_patch_embed``: the patch projection keeps MoCo v3's random init, uniform in
    ±√(6 / (3p² + D)) (xavier over a patch's fan-in), with ``requires_grad=False``.
    ``grad_checkpointing``: in training, recompute each block in backward, keeping only its
    input (B, 1 + N, D) instead of its activations; also settable later as an attribute.

    Init as DINO's ``_init_weights``: truncated normal (std 0.02) for the position embeddings,
    the class token and every Linear weight, zero biases, LayerNorm γ = 1 and β = 0; the patch
    conv keeps PyTorch's default unless frozen.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = DEPTH,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 drop_path_subset: bool = False, freeze_patch_embed: bool = False,
                 grad_checkpointing: bool = False):
        super().__init__()
        if patch_size < 1 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}; the position "
                             f"embeddings need a whole grid of patches")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_features: int = embed_dim
        self.grad_checkpointing = grad_checkpointing
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # (1, 1 + G², D)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 ... drop_path
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, r, drop_path_subset) for r in rates))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if freeze_patch_embed:
            proj = self.patch_embed.proj
            bound = math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
            proj.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        grid = x.shape[-1] // self.patch_size
        x = self.patch_embed(x)  # (B, N, D), N = grid²
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        # under autocast cat promotes the bf16 patches to the fp32 token's dtype, as timm's does
        x = torch.cat([cls, x], dim=1) + resample_pos_embed(self.pos_embed, grid)  # (B, 1 + N, D)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.blocks:  # saves each block's input only; drop path's draw is replayed
                x = checkpoint(block, x, use_reentrant=False)  # (B, 1 + N, D)
        else:
            x = self.blocks(x)  # (B, 1 + N, D)
        return self.norm(x[:, 0])  # (B, D); LayerNorm is per token, so only [CLS] needs it


def vision_transformer(name: str, *, img_size: int = 224, patch_size: int = 16, drop_path: float = 0.0,
                       drop_path_subset: bool = False, freeze_patch_embed: bool = False,
                       grad_checkpointing: bool = False) -> VisionTransformer:
    """The ViT ``name`` (a key of :data:`VIT_SIZES`) for ``img_size`` inputs split into
    ``patch_size`` patches; the other arguments: :class:`VisionTransformer`'s."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose from {', '.join(VIT_SIZES)}")
    dim, heads = VIT_SIZES[name]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=dim, num_heads=heads,
                             drop_path=drop_path, drop_path_subset=drop_path_subset,
                             freeze_patch_embed=freeze_patch_embed, grad_checkpointing=grad_checkpointing)
