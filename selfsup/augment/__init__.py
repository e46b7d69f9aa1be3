"""Batched, on-device image augmentation for contrastive learning.

Every transform here acts on a whole batch at once with per-sample random
parameters drawn from an explicit ``torch.Generator``: there is no Python loop
over images and no host synchronisation, so the data path runs at device speed
on CPU or CUDA and seeded runs are reproducible.

The SimCLR recipe (Chen et al. 2020, Sec. 3 and Appendix A) is::

    random resized crop + horizontal flip    -> one bilinear resampling
    [+ vertical flip, quarter turns: off in the papers; for images with no "up"]
    colour jitter (p=0.8, random op order)   -> brightness/contrast/saturation/hue
    random grayscale (p=0.2)
    Gaussian blur (p=0.5, kernel 10% of size)
    [solarize, used by BYOL's second view]
    normalise                                -> float32 (B, 3, S, S), channels_last

Building blocks take float images ``(B, 3, H, W)`` in ``[0, 1]`` and
per-sample parameter tensors of shape ``(B,)`` so that other recipes (BYOL's
asymmetric views, multi-crop) can be composed from them.

The package, one idea per module (each imports only torch and the modules listed above it):

* :mod:`.batch` -- the shared layout: uint8 -> float, per-sample masks and broadcasting, normalise;
* :mod:`.crop` -- random resized crop, flips and quarter turns as one resampling (``sample_crop_boxes``, ...);
* :mod:`.color` -- colour jitter in a per-sample random order, grayscale;
* :mod:`.filters` -- Gaussian blur and solarisation;
* :mod:`.views` -- ``ViewConfig`` and the papers' recipes (SimCLR, BYOL, multi-crop), plain data;
* :mod:`.pipeline` -- ``Augment``, which applies a ``ViewConfig`` to a uint8 batch, and ``eval_view``.

Every public name is re-exported here, so ``from selfsup.augment import X`` is the way in.
"""

from .batch import normalize, to_float_nchw
from .color import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    JitterParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_color_jitter,
    color_jitter,
    random_grayscale,
    rgb_to_grayscale,
    sample_jitter_params,
)
from .crop import boxes_to_theta, quarter_turns, random_resized_crop_flip, resized_crop, sample_crop_boxes
from .filters import (
    blur_kernel_size,
    gaussian_blur,
    gaussian_kernels,
    random_gaussian_blur,
    random_solarize,
    solarize,
)
from .pipeline import Augment, eval_view
from .views import ViewConfig, byol_view, crop_flip_view, multi_crop_views, simclr_view

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
    "ViewConfig",
    "simclr_view",
    "crop_flip_view",
    "byol_view",
    "multi_crop_views",
    "Augment",
    "eval_view",
    "JitterParams",
    "sample_crop_boxes",
    "boxes_to_theta",
    "quarter_turns",
    "resized_crop",
    "random_resized_crop_flip",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "sample_jitter_params",
    "apply_color_jitter",
    "color_jitter",
    "random_grayscale",
    "blur_kernel_size",
    "gaussian_kernels",
    "gaussian_blur",
    "random_gaussian_blur",
    "solarize",
    "random_solarize",
    "normalize",
    "to_float_nchw",
]
