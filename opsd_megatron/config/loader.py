"""Loading a run's configuration: a YAML recipe (``yaml.safe_load``; ``defaults_from`` names a
recipe it extends) merged over the dataclass defaults, then ``key=value`` dotlists (NeMo style:
``trainer.max_steps=100 loss.beta=0.5``). Unknown keys fail naming the closest valid key; wrong
types name the key and the expected type; every error names where the key was set (the recipe's
line or the override). Renamed keys are still accepted with a warning (``RENAMED``); removed keys
whose meaning changed stop with what replaces them (``REMOVED``)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from opsd_megatron.config.base import ConfigError
from opsd_megatron.config.schema import OPSDConfig


def _valid_keys(node, prefix="") -> list[str]:
    keys = []
    for k in node.keys() if OmegaConf.is_dict(node) else []:
        path = f"{prefix}{k}"
        keys.append(path)
        child = node._get_node(k)
        if OmegaConf.is_dict(child) and not child._is_none():
            keys.extend(_valid_keys(child, path + "."))
    return keys


def _declared_type(key: str, cls: type = OPSDConfig) -> str:
    """The annotation of a dotted key in the dataclass tree, e.g. 'int' for trainer.max_steps."""
    for part in key.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return "the declared type"
        cls = hints[part]
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if args and not dataclasses.is_dataclass(cls):
            cls = args[0] if len(args) == 1 else cls
    return getattr(cls, "__name__", str(cls))


def _explain(
    err: OmegaConfBaseException, schema, origin: str, cls: type = OPSDConfig
) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(
            f"{origin}: bad value for '{key}' (expected {_declared_type(key, cls)}): "
            f"{err.msg.splitlines()[0]}"
        )
    return ConfigError(f"{origin}: {err}")


def _recipe_chain(recipe: str | Path | None, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The recipe and, first, the recipes it names in ``defaults_from`` (relative to itself)."""
    if recipe is None:
        return []
    path = Path(recipe)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: defaults_from cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: recipe file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    base = data.pop("defaults_from", None)
    chain = _recipe_chain(path.parent / base, seen + (path.resolve(),)) if base else []
    return chain + [(path, data)]


def _line_of(path: Path, key: str) -> int | None:
    """1-based line where the dotted ``key`` is set in a YAML file, if it is."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        hit = next(((k, v) for k, v in node.value if k.value == part), None)
        if hit is None:
            return None
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


def _origin(chain: list[tuple[Path, dict]], overrides: list[str], key: str) -> str | None:
    """Where ``key`` got its value: the last override setting it, else ``recipe:line``."""
    for item in reversed(overrides):
        if item.split("=", 1)[0].strip() == key:
            return f"override '{item}'"
    for path, _ in reversed(chain):
        line = _line_of(path, key)
        if line is not None:
            return f"{path}:{line}"
    return None


KEY_IN_MESSAGE = re.compile(r"\b([a-z_]+(?:\.[a-z_0-9]+)+)\b")


def _located(err: Exception, chain, overrides) -> ConfigError:
    """A validation error prefixed with where its key was set (``recipe.yaml:12: trainer...``)."""
    match = KEY_IN_MESSAGE.search(str(err))
    where = _origin(chain, overrides, match.group(1)) if match else None
    return ConfigError(f"{where}: {err}" if where else str(err))


# old name -> new name (dotted), accepted with a warning so existing recipes keep working
RENAMED = {
    "teacher.kind": "teacher.update",
    "teacher.model.kind": "teacher.weights",
    "teacher.model.offload": "teacher.offload",
}

REMOVED = {
    "rollout.vllm.gpu_memory_utilization": (
        "vLLM's memory is sized from what is free once the trainer is built: set "
        "rollout.vllm.memory_fraction (of that free memory) and, to fix the KV cache, "
        "rollout.vllm.kv_cache_gb"
    ),
}


def _removed(key: str, where: str) -> None:
    if key in REMOVED:
        raise ConfigError(f"{where}: '{key}' was removed; {REMOVED[key]}")


def _renamed(key: str, where: str) -> str:
    _removed(key, where)
    new = RENAMED.get(key, key)
    if new != key:
        warnings.warn(
            f"{where}: '{key}' is now '{new}' (the old name still works for now)",
            FutureWarning,
            stacklevel=3,
        )
    return new


def _parent_of(data: dict, dotted: str) -> dict | None:
    """The mapping that holds the dotted key's last part, if the key is set in ``data``."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and leaf in node else None


def _rename_keys(data: dict, where: str) -> dict:
    """``data`` (a recipe mapping) with each renamed key moved to its new place."""
    import copy

    data = copy.deepcopy(data)
    for old in REMOVED:
        if _parent_of(data, old) is not None:
            line = _line_of(Path(where), old) if Path(where).is_file() else None
            _removed(old, f"{where}:{line}" if line else where)
    for old, new in RENAMED.items():
        node = _parent_of(data, old)
        if node is None:
            continue
        value = node.pop(old.rsplit(".", 1)[-1])
        _renamed(old, where)
        *new_parents, new_leaf = new.split(".")
        target = data
        for part in new_parents:
            target = target.setdefault(part, {})
        target[new_leaf] = value
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and teacher.get("model") == {}:  # emptied by the moves above
        del teacher["model"]
    return data


def load_structured(cls: type, recipe: str | Path | None, overrides: list[str] | None = None):
    """An instance of the dataclass ``cls``: its defaults, then the recipe chain, then overrides.
    Errors name where the offending key was set: ``recipe.yaml:LINE`` or the override."""
    schema = OmegaConf.structured(cls)
    cfg = schema
    chain = _recipe_chain(recipe)
    overrides = list(overrides or [])
    for path, data in chain:
        try:
            cfg = OmegaConf.merge(cfg, _rename_keys(data, str(path)) if cls is OPSDConfig else data)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            line = _line_of(path, key) if key else None
            raise _explain(err, schema, f"{path}:{line}" if line else str(path), cls) from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must be key=value")
        key, value = item.split("=", 1)
        if cls is OPSDConfig:
            key = _renamed(key.strip(), f"override '{item}'")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, f"override '{item}'", cls) from err
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as err:
        raise _located(err, chain, overrides) from err
    except OmegaConfBaseException as err:
        raise _explain(err, schema, str(recipe or "config"), cls) from err


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> OPSDConfig:
    """The run's config: recipe YAML merged over the defaults, then ``key=value`` overrides;
    every section validated, and the model given a source."""
    result = load_structured(OPSDConfig, recipe, overrides)
    if not result.model.sources():
        raise ConfigError(
            f"{recipe or 'config'}: set one of model.hf_dir, model.megatron_dir, model.architecture"
        )
    return result


def to_yaml(cfg: OPSDConfig) -> str:
    """The config as YAML (what each checkpoint keeps as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: OPSDConfig) -> dict[str, Any]:
    """The config as plain dicts and lists."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))
