"""Turning config nodes into objects, with one-line errors that name the offending key."""

from __future__ import annotations

import inspect

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from alignment.errors import AlignmentError, ConfigError


def _accepted_keywords(target) -> tuple[set[str], bool]:
    func = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(func).parameters.values()
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return {p.name for p in params}, accepts_any


def check_keys(node: DictConfig, key: str) -> object:
    """Resolve ``node._target_`` and reject keys its signature does not take (named, e.g. ``method.objective.bta``)."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key}: missing _target_")
    try:
        target = get_object(node._target_)
    except Exception as err:  # ImportError, AttributeError from a mistyped _target_
        raise ConfigError(f"{key}._target_: cannot import {node._target_!r}") from err
    accepted, accepts_any = _accepted_keywords(target)
    if not accepts_any:
        unknown = sorted(k for k in node if k != "_target_" and not str(k).startswith("_") and k not in accepted)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key for {node._target_} "
                              f"(accepted: {', '.join(sorted(accepted - {'self'}))})")
    return target


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


def to_plain(node) -> dict | list | None:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def require_positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value

