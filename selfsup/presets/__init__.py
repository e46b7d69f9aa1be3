"""The presets: one YAML file per named recipe, shipped with the package (``NAME.yaml`` here).

A file says what it is: ``about`` (what ``selfsup pretrain --list-presets`` prints), ``source``
(the paper or official code it follows) and optionally ``base``, the preset it changes. The rest
are settings, and only those that differ from the base, or without one from the defaults with
the method's own recipe (``config.METHOD_DEFAULTS``); so every preset names its ``method`` and
``data.source``, itself or through its base. A file whose name starts with ``_`` is not a
preset and is not listed: a base (``_imagenet``) or the method recipes (``_methods``).

This module reads every settings file (a preset, ``--config FILE.yaml``, a run's ``config.yaml``)
the same way: a key given twice is an error, not the last one winning, and a file that is not a
YAML mapping is named (:func:`load_yaml`); :func:`upgrade` reads configs written before the
per-method settings. :mod:`selfsup.config` applies the settings and names what is wrong.
"""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

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


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file")
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' is not a regular file; pass a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except DuplicateKey as e:
        raise ConfigError(f"config file '{path}' sets {e.key!r} twice in one mapping (lines {e.first} and "
                          f"{e.again}); keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def preset(name: str) -> dict[str, Any]:
    """Preset ``name``'s settings (``selfsup/presets/NAME.yaml`` over its base's)."""
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"unknown preset '{name}'; {f'did you mean {close[0]!r}? ' if close else ''}"
                          f"available: {', '.join(names)}")
    return preset_settings(name)


#: Where a config written before the per-method temperatures keeps its top-level ``temperature``:
#: the key of the method that read it (distill's contrastive term is SimCLR's NT-Xent).
LEGACY_TEMPERATURE = {"simclr": "simclr", "distill": "simclr", "moco": "moco", "swav": "swav"}


def upgrade(data: dict[str, Any], method: str) -> dict[str, Any]:
    """A config mapping written before the per-method settings, in today's keys, unchanged otherwise.

    The rule, for a mapping with a top-level ``temperature`` (every config.yaml before then had
    one; ``--set temperature=T`` too): the value becomes the temperature of ``method``, the method
    that read it (see :data:`LEGACY_TEMPERATURE`; BYOL, SimSiam and DINO never read it and it is
    dropped). A whole saved config (it also has a ``byol`` section) without ``byol.per_view_bn``
    gets false, the joint pass those runs trained with. Every other key kept its name and meaning.
    """
    if "temperature" not in data:
        return data
    data = dict(data)
    temperature = data.pop("temperature")
    section = LEGACY_TEMPERATURE.get(method)
    if section and isinstance(data.get(section) or {}, dict):  # else apply_updates names the bad section
        data[section] = {"temperature": temperature, **(data.get(section) or {})}
    if isinstance(data.get("byol"), dict):
        data["byol"] = {"per_view_bn": False, **data["byol"]}
    return data
