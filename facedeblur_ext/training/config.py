"""Training configuration: YAML or TOML files, merged over a task's defaults, plus overrides.

Overrides are ``dotted.key=value`` strings; the value is parsed as YAML, so ``8``, ``1e-4``,
``true``, ``null``, ``[32, 64]`` and ``{a: 1}`` have their natural types and anything else is a
string. A value YAML cannot parse is taken as the plain string it is (``data.pattern=*.jpg``,
where YAML would read ``*`` as an alias), unless it begins like a YAML list, table or quoted
string (``[``, ``{``, ``"``, ``'``): then it is a typo, refused with a one-line ``ValueError``.
``a.b=...`` creates missing intermediate tables.

**Which new keys an override may create.** The tables read by the shared trainer and the data
split (the top level, ``train``, ``val``, ``optim``, ``distributed``, ``data``; the same tables
under ``stages.<stage>``) have a fixed set of keys, :data:`KNOWN_KEYS`, which includes keys the
packaged configs leave out (``optim.cosine_steps``, ``train.max_steps``). An override that adds
a key outside that set to one of these tables is a typo (``train.max_step=2`` would be ignored)
and :func:`load_config` refuses it, naming the closest known key. Every other table belongs to
a task or to a class it builds (``model``, ``loss``, dataset and synthesizer ``args``,
``optim.per_model``) and takes keys a config file may leave out (a class's optional
arguments), so overrides may add keys there; a class refuses an argument it does not take.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["KNOWN_KEYS", "apply_overrides", "deep_merge", "default_config_path", "load_config",
           "read_config"]

#: The keys of the tables with a fixed set of keys (see the module docstring), by table path
#: ("" is the top level). The trainer's module docstring says what each one does.
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"task", "seed", "output_dir", "device", "model", "loss", "optim", "train",
                   "val", "distributed", "data", "stage", "stages", "inference"}),
    "train": frozenset({"epochs", "max_steps", "batch_size", "num_workers", "num_threads",
                        "shuffle", "amp", "ema", "log_every", "checkpoint_every",
                        "keep_checkpoints", "tensorboard", "progress"}),
    "train.ema": frozenset({"enabled", "decay"}),
    "val": frozenset({"every_steps", "every_epochs", "at_end", "batch_size", "max_batches",
                      "preview"}),
    "val.preview": frozenset({"images", "frames"}),
    "optim": frozenset({"lr", "betas", "momentum", "weight_decay", "per_model",
                        "lr_decay_per_epoch", "grad_clip_norm", "cosine_steps", "warmup_steps",
                        "min_lr_ratio", "lr_multipliers"}),
    "distributed": frozenset({"backend", "check_replicas_every"}),
    "data": frozenset({"root", "pattern", "val_root", "val_count", "analyzer", "blur", "train",
                       "val", "collate"}),
}


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


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the problem and where (PyYAML's own message spans
    several lines, with the offending text and a caret)."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def parse_override_value(item: str, raw: str):
    """The value of the override ``item`` (``key=raw``): see the module docstring.

    Raises:
        ValueError: ``raw`` begins like YAML structure or a quoted string but does not parse.
    """
    if not raw.strip():
        return ""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as exc:
        if raw.lstrip()[:1] in ("[", "{", '"', "'"):
            raise ValueError(f"override {item!r}: the value is not valid YAML "
                             f"({describe_yaml_error(exc)})") from None
        return raw.strip()


def read_config(path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict.

    Raises:
        ValueError: a syntax error (one line, naming the file), or a top level that is not a
            table.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
    else:
        try:
            data = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {describe_yaml_error(exc)}") from None
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
        value = parse_override_value(item, raw)
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


def _fixed_table(path: tuple) -> str | None:
    """The :data:`KNOWN_KEYS` table that holds the key at ``path``, or None (a free table)."""
    table = path[:-1]
    if table[:1] == ("stages",):
        if len(table) < 2:
            return None  # a stage name: the task checks those
        table = table[2:]  # a stage's tables are merged over the top-level ones
    name = ".".join(map(str, table))
    return name if name in KNOWN_KEYS else None


def _check_new_keys(before: Mapping, after: Mapping, override: str, prefix: tuple = ()) -> None:
    """Refuse a key that ``override`` added (in ``after``, not in ``before``) to a table of
    :data:`KNOWN_KEYS` that does not know it.

    Raises:
        ValueError: naming the closest known key.
    """
    for key, value in after.items():
        path = (*prefix, key)
        table = _fixed_table(path) if key not in before else None
        if table is not None and key not in KNOWN_KEYS[table]:
            known = sorted(KNOWN_KEYS[table])
            message = f"override {override!r}: unknown key {'.'.join(map(str, path))}"
            close = difflib.get_close_matches(str(key), known, n=1)
            if close:
                message += f" (did you mean {'.'.join(map(str, (*path[:-1], close[0])))}?)"
            raise ValueError(f"{message}; the keys of {table or 'the top level'} are "
                             f"{', '.join(known)}")
        old = before.get(key)
        if isinstance(value, Mapping):
            _check_new_keys(old if isinstance(old, Mapping) else {}, value, override, path)


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
    """The task's packaged defaults, merged with the file ``path`` and then ``overrides``.

    Raises:
        ValueError: an override adds an unknown key to a table of :data:`KNOWN_KEYS`.
    """
    config = {}
    default = default_config_path(task)
    if default.exists():
        config = read_config(default)
    if path is not None:
        config = deep_merge(config, read_config(resolve_config_path(path)))
    for item in overrides:
        updated = apply_overrides(config, [item])
        _check_new_keys(config, updated, item)
        config = updated
    config.setdefault("task", task)
    if config["task"] != task:
        raise ValueError(f"config is for task {config['task']!r}, not {task!r}")
    return config
