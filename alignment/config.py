"""Turning config nodes into objects, and checking them first, with one-line errors that name the offending key.

A YAML file is checked like the command line (docs/contract.md#configs-are-checked):

- ``check_keys(node, key)``: the node's ``_target_`` imports, every key is a parameter of its signature, and every
  value has the type the signature annotates (``beta: float`` refuses ``'abc'``); nested nodes with their own
  ``_target_`` (e.g. the terms of a composed objective) are checked the same way. A value interpolated from another
  key (``beta: ${method.beta}``) is reported under that key, the one the user typed.
- ``check_schema(node, schema, key)``: plain nodes (optimizer, lr schedule, sample grid ...) against a mapping of
  key -> type; unknown keys are named.
- small validators (``positive_int``, ``number``, ``integer``, ``boolean``) shared by every entry point.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from alignment.errors import AlignmentError, ConfigError

_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


# ------------------------------------------------------------------------------------------------ validators
def positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(value)



def integer(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def existing_path(value, key: str, kind: str = "file") -> Path | None:
    """``None``, or an existing file (``kind="file"``), folder (``"dir"``) or either (``"any"``)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a path, got {value!r}")
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if kind == "file" and not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    return path


def resolve_device(name, key: str = "device"):
    """``auto`` (this process's GPU — ``LOCAL_RANK`` under torchrun — when there is one, else the CPU), ``cpu``,
    ``cuda``, ``cuda:1`` ... -> a torch.device."""
    import os

    import torch

    name = "auto" if name is None else str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{key}: unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} requested but CUDA is not available")
    return device


def to_plain(node) -> dict | list | None:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


# ------------------------------------------------------------------------------------------------ types
def describe_type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is Union or origin is types.UnionType:
        names = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return "a list"
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def type_matches(value, annotation) -> bool:
    """Whether a config value (plain Python, after ``to_container``) fits a signature annotation. Annotations the
    check does not understand (classes, callables, ``Any``) accept anything: instantiation decides."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(value, (DictConfig, dict)) and "_target_" in value:
        return True  # a nested object built by Hydra: checked as a node of its own
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return any(type_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        item = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else None
        return item is None or all(type_matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, (dict, DictConfig))
    return True


def _signature(target) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    func = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(func).parameters)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names only
        hints = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, hints, accepts_any


def source_key(node: DictConfig, name: str, key: str) -> str:
    """The key a user should fix for ``node[name]``: the interpolated key (``method.beta`` for
    ``beta: ${method.beta}``), else ``key.name``."""
    try:
        raw = OmegaConf.to_container(node, resolve=False).get(name)
    except Exception:  # noqa: BLE001
        raw = None
    match = _INTERPOLATION.match(raw) if isinstance(raw, str) else None
    return match.group(1) if match else f"{key}.{name}"


def check_keys(node: DictConfig, key: str) -> object:
    """Resolve ``node._target_``; reject keys its signature does not take and values of the wrong type (named, e.g.
    ``method.objective.bta: unknown key`` or ``method.beta must be a number, got 'abc'``); recurse into nested
    ``_target_`` nodes. Returns the target."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key}: missing _target_")
    try:
        target = get_object(node._target_)
    except Exception as err:  # ImportError, AttributeError from a mistyped _target_
        raise ConfigError(f"{key}._target_: cannot import {node._target_!r}") from err
    params, hints, accepts_any = _signature(target)
    accepted = {name for name, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for name in node:
        name = str(name)
        if name == "_target_" or name.startswith("_"):
            continue
        if name not in accepted:
            if accepts_any:
                continue
            raise ConfigError(f"{key}.{name}: unknown key for {node._target_} "
                              f"(accepted: {', '.join(sorted(accepted - {'self'}))})")
        try:
            value = node[name]
        except Exception as err:  # noqa: BLE001 - a broken interpolation
            raise ConfigError(f"{key}.{name}: {str(err).splitlines()[0]}") from None
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
        annotation = hints.get(name, params[name].annotation)
        if not type_matches(plain, annotation):
            raise ConfigError(f"{source_key(node, name, key)} must be {describe_type(annotation)}, got {plain!r}")
        _check_nested(value, f"{key}.{name}")
    return target


def _check_nested(value, key: str) -> None:
    if isinstance(value, DictConfig):
        if "_target_" in value:
            check_keys(value, key)
        else:
            for name in value:
                _check_nested(value[name], f"{key}.{name}")
    elif isinstance(value, ListConfig):
        for i, item in enumerate(value):
            _check_nested(item, f"{key}[{i}]")


def instantiate_checked(node: DictConfig, key: str, **extra):
    """``hydra.utils.instantiate`` after ``check_keys``; plain containers, not DictConfigs, reach the target."""
    check_keys(node, key)
    try:
        return instantiate(node, _convert_="all", **extra)
    except InstantiationException as err:
        # Hydra wraps whatever the target raised; our own errors already name their key, so pass them on as-is.
        cause = err.__cause__
        while cause is not None and not isinstance(cause, AlignmentError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise ConfigError(f"{key}: {str(err.__cause__ or err).splitlines()[0]}") from err


def check_signature_keys(node, target, key: str, ignore: Sequence[str] = ()) -> None:
    """Keys of a plain node that are passed to ``target(**node)`` (e.g. ``method.lora`` -> ``add_lora``): unknown
    keys and wrong types are named."""
    if node is None:
        return
    params, hints, accepts_any = _signature(target)
    for name in node:
        name = str(name)
        if name in ignore:
            continue
        if name not in params or params[name].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                        inspect.Parameter.VAR_KEYWORD):
            if accepts_any:
                continue
            usable = sorted(n for n, p in params.items() if n not in ("self", "unet") and p.kind not in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD))
            raise ConfigError(f"{key}.{name}: unknown key (accepted: {', '.join(usable)})")
        value = node[name]
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
        annotation = hints.get(name, params[name].annotation)
        if not type_matches(plain, annotation):
            raise ConfigError(f"{source_key(node, name, key)} must be {describe_type(annotation)}, got {plain!r}")


def check_schema(node, schema: Mapping[str, Any], key: str, open_keys: bool = False) -> None:
    """A plain node against ``{name: annotation}``: unknown keys (unless ``open_keys``) and wrong types are named."""
    if node is None:
        return
    if not isinstance(node, (DictConfig, dict)):
        raise ConfigError(f"{key} must be a mapping, got {node!r}")
    for name in node:
        name = str(name)
        if name not in schema:
            if open_keys:
                continue
            raise ConfigError(f"{key}.{name}: unknown key (accepted: {', '.join(sorted(schema))})")
        value = node[name]
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
        if not type_matches(plain, schema[name]):
            where = source_key(node, name, key) if isinstance(node, DictConfig) else f"{key}.{name}"
            raise ConfigError(f"{where} must be {describe_type(schema[name])}, got {plain!r}")
