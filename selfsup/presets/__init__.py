"""The presets: one YAML file per named recipe, shipped with the package (``NAME.yaml`` here).

A file says what it is: ``about`` (what ``selfsup pretrain --list-presets`` prints), ``source``
(the paper or official code it follows) and optionally ``base``, the preset it changes. The rest
are settings, and only those that differ from the base, or without one from the defaults with
the method's own recipe (``config.METHOD_DEFAULTS``); so every preset names its ``method`` and
``data.source``, itself or through its base. A file whose name starts with ``_`` is not a
preset and is not listed: a base (``_imagenet``) or the method recipes (``_methods``).

This module reads YAML as every settings file is read (a key given twice is an error, not the
last one winning); :mod:`selfsup.config` applies the settings and names what is wrong.
"""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

#: The keys of a preset file that describe it rather than set anything.
ABOUT_KEYS = ("about", "source", "base")


class DuplicateKey(Exception):
    """Raised by :class:`UniqueKeyLoader`: ``key`` at line ``first`` and again at ``again``."""

    def __init__(self, key: object, first: int, again: int):
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' overrides by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def preset_names() -> list[str]:
    """Every preset, by name (the bases ``_*`` left out)."""
    return sorted(f.name.removesuffix(".yaml") for f in resources.files(__name__).iterdir()
                  if f.name.endswith(".yaml") and not f.name.startswith("_"))


def read_preset(name: str) -> dict[str, Any]:
    """Preset (or base) ``name``'s file as written, ``about``, ``source`` and ``base`` included;
    KeyError if there is none."""
    file = resources.files(__name__) / f"{name}.yaml"
    if "/" in name or not file.is_file():
        raise KeyError(name)
    return yaml.load(file.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys replacing its own, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_settings(name: str) -> dict[str, Any]:
    """Preset ``name``'s settings over those of its base (and the base's base, ...)."""
    recipe = read_preset(name)
    settings = {key: value for key, value in recipe.items() if key not in ABOUT_KEYS}
    return merge(preset_settings(recipe["base"]), settings) if "base" in recipe else settings


def method_recipes() -> dict[str, dict[str, Any]]:
    """Each method's own recipe by method name (``_methods.yaml``, a mapping of settings each)."""
    return read_preset("_methods")
