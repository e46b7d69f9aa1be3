"""selfsup: self-supervised visual representation learning, the SimCLR family and successors.

The Python API (imported on first use, so ``import selfsup`` stays light)::

    selfsup.pretrain(config)                  # a Config or a dict, e.g. {"preset": ..., "train": {...}}
    backbone = selfsup.load_backbone(path)    # a run folder, checkpoint, backbone.pt or export
    selfsup.extract_features(backbone, images_or_folder)   # (N, D) float32
    selfsup.export_backbone(run, "torchvision" | "safetensors")
    vectors, paths, labels = selfsup.embed(run, "digits" | folder | archive)   # (N, D) float32
"""
__version__ = "0.1.0"

_LAZY = {"pretrain": "api", "load_backbone": "api", "extract_features": "api", "image_files": "api",
         "embed": "api", "Embeddings": "api", "Backbone": "api", "export_backbone": "export",
         "apply_cifar_stem": "export", "Config": "config", "resolve": "config"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
