"""Training configuration: YAML or TOML files, merged over a task's defaults, plus overrides.

Overrides are ``dotted.key=value`` strings; the value is parsed as YAML, so ``8``, ``1e-4``,
``true``, ``null``, ``[32, 64]`` and ``{a: 1}`` have their natural types and anything else is a
string. ``a.b=...`` creates missing intermediate tables.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["apply_overrides", "deep_merge", "default_config_path", "load_config", "read_config"]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; read it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """``yaml.safe_load`` with YAML 1.2 style exponent floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only


def read_config(path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = parse_yaml(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a config must be a table/mapping")
    return data


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursive merge: tables merge key by key, every other value in ``update`` replaces.

    A table that names a different ``class`` than the one it updates (a dataset swapped for
    another) replaces it whole: the old class's arguments would not fit the new one.
    """
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        old = out.get(key)
        swapped = (isinstance(value, Mapping) and isinstance(old, Mapping)
                   and "class" in value and value.get("class") != old.get("class"))
        if isinstance(value, Mapping) and isinstance(old, Mapping) and not swapped:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: Mapping, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of ``config``."""
    out = copy.deepcopy(dict(config))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        value = parse_yaml(raw) if raw.strip() else ""
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a table")
            node = child
        node[parts[-1]] = value
    return out


def default_config_path(task: str) -> Path:
    """The packaged default config of ``task`` (``facedeblur_ext/configs/<task>.yaml``)."""
    return Path(str(resources.files("facedeblur_ext") / "configs" / f"{task}.yaml"))


def resolve_config_path(path) -> Path:
    """``path`` itself when it exists, else the packaged config of that name
    (``cfmd_kernel_blur`` -> ``facedeblur_ext/configs/cfmd_kernel_blur.yaml``)."""
    path = Path(path)
    if path.exists():
        return path
    packaged = default_config_path(path.stem)
    if path.parent == Path(".") and path.suffix in ("", ".yaml") and packaged.exists():
        return packaged
    raise FileNotFoundError(f"config file {path} does not exist (nor is it a packaged config: "
                            f"{', '.join(sorted(packaged_config_names()))})")


def packaged_config_names() -> list[str]:
    """Names of the configs shipped in ``facedeblur_ext/configs``."""
    folder = default_config_path("x").parent
    return [p.stem for p in folder.glob("*.yaml")]


def load_config(task: str, path=None, overrides: Iterable[str] = ()) -> dict:
    """The task's packaged defaults, merged with the file ``path`` and then ``overrides``."""
    config = {}
    default = default_config_path(task)
    if default.exists():
        config = read_config(default)
    if path is not None:
        config = deep_merge(config, read_config(resolve_config_path(path)))
    config = apply_overrides(config, overrides)
    config.setdefault("task", task)
    if config["task"] != task:
        raise ValueError(f"config is for task {config['task']!r}, not {task!r}")
    return config
