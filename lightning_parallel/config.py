"""Configs composed and built by Hydra, checked against their targets' annotations first.

`compose` composes a primary YAML file and command-line overrides with Hydra's Compose API, so
every form of Hydra's override grammar works as under a Hydra app: `group=option`, `key=value`,
`+key=value`, `++key=value`, `~key`, `group@package=option`, `+experiment=x` (whose defaults may
`override` a group) and interpolation between groups. Nothing is written to disk and the working
directory stays, so every rank of a run (torchrun, srun, Lightning's launcher) composes the same.

`instantiate` checks each `_target_` node's values against the annotations of the argument they
go to, then builds it with `hydra.utils.instantiate`. A wrong key, type or value fails in the
launching process, before any worker starts, with a message naming the key and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import hydra
from hydra.errors import (ConfigCompositionException, HydraException, InstantiationException, MissingConfigException,
                          OverrideParseException)
from omegaconf import DictConfig, OmegaConf

_UNIONS = (Union, types.UnionType)


class ConfigError(ValueError):
    """A config that cannot run. The message names the key, the bad value and the fix."""


# ------------------------------------------------------------------------------ composing


def compose(primary: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The primary config composed by Hydra with the command-line overrides (without `hydra:`)."""
    primary = Path(primary).resolve()
    try:
        with hydra.initialize_config_dir(config_dir=str(primary.parent), version_base="1.3"):
            return hydra.compose(config_name=primary.stem, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(_composition_message(err, primary, list(overrides))) from err


def _composition_message(err: HydraException, primary: Path, overrides: list[str]) -> str:
    """Hydra's reason in our words where we have better ones (the key's neighbours, the fix)."""
    text = str(err)
    if isinstance(err, OverrideParseException):
        word = re.search(r"Error parsing override '(.*)'", text)
        word = word[1] if word else " ".join(overrides)
        reason = text.splitlines()[1] if "\n" in text else text  # Hydra's second line says what is wrong
        return (f"{word!r} is not an override: write key=value (e.g. trainer.devices=2), group=option "
                f"(e.g. strategy=dp), +key=value to add a key or ~key to remove one. Hydra says: {reason}")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        path = primary.parent / group / f"{option}.yaml"
        return f"{group}={option}: there is no {path}. Choose one of: {', '.join(sorted(err.options))}."
    if isinstance(err, ConfigCompositionException):
        missing = re.match(r"Could not override '(.*)'\.", text) or re.match(r"Could not delete from config\. '(.*)' does", text)
        if missing:
            key = missing[1]
            word = next((w for w in overrides if w.lstrip("+~").split("=", 1)[0] == key), None)
            if word is None:
                return text
            others = compose(primary, [w for w in overrides if w != word])
            return unknown_key_message(others, key, word)
    return text


def unknown_key_message(config: DictConfig, key: str, word: str) -> str:
    """`word` (an override) names `key`, which `config` does not have."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key) if parent_key else config
    siblings = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    where = f"under {parent_key}" if parent_key else "at the top level"
    message = (f"{word}: the config has no key {key}{did_you_mean(name, siblings, parent_key)}. "
               f"Keys {where}: {', '.join(siblings) or 'none'}.")
    if not word.startswith("~"):
        message += f" To add a new key, write +{word}."
    return message


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""


# --------------------------------------------------------------------------- instantiating


def instantiate(config: DictConfig | dict, key: str, **extra: Any) -> Any:
    """`hydra.utils.instantiate(config, **extra)` after `check(config, key)`. `key` is the
    config's path, for messages. Containers reach the target as plain dicts and lists."""
    values = check(config, key)
    try:
        return hydra.utils.instantiate(config, _convert_="all", **extra)
    except InstantiationException as err:
        cause, target_name = err.__cause__, values["_target_"]
        unknown = unexpected_keyword(cause) if isinstance(cause, TypeError) else None
        if unknown in values:
            target = import_target(target_name, key)
            raise ConfigError(unknown_argument_message(target, target_name, key, unknown, values[unknown])) from cause
        raise ConfigError(f"In {key} ({target_name}): {cause or err}") from err


def check(config: DictConfig | dict, key: str) -> dict:
    """Refuses a node without a `_target_`, a target that cannot be imported, and a value that does
    not fit its argument's annotation, in nested `_target_` nodes too. Returns the resolved values."""
    values = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if "_target_" not in values:
        raise ConfigError(f"{key} has no _target_: add `_target_: package.module.Class` to say what it builds.")
    _check_node(values, key)
    return values


def _check_node(values: dict, key: str) -> None:
    target_name = values["_target_"]
    target = import_target(target_name, key)
    arguments = {}
    for name, value in values.items():
        if name.startswith("_") and name.endswith("_"):
            continue  # Hydra's own keys: _target_, _convert_, _partial_, _args_, _recursive_
        nodes = _target_nodes(value)
        for suffix, node in nodes:
            _check_node(node, f"{key}.{name}{suffix}")
        if not nodes:  # what Hydra builds reaches the target as an object: only plain values are typed
            arguments[name] = value
    check_types(target, target_name, arguments, key)


def _target_nodes(value: Any) -> list[tuple[str, dict]]:
    """The `_target_` nodes Hydra builds in `value` (itself, or items of a list), with their key suffix."""
    if isinstance(value, dict):
        return [("", value)] if "_target_" in value else []
    if isinstance(value, list):
        return [(f"[{i}]", item) for i, item in enumerate(value) if isinstance(item, dict) and "_target_" in item]
    return []


def import_target(name: str, key: str) -> Any:
    """`package.module.Attr` (or `module.Class.attr`) as an object."""
    try:
        return hydra.utils.get_object(name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"{key}._target_={name!r} cannot be imported: write it as package.module.Class, with the module on the "
            "Python path (the example scripts put examples/ there, so gpt.GPT is examples/gpt.py's GPT)."
        ) from err


def unexpected_keyword(err: TypeError) -> str | None:
    marker = "unexpected keyword argument '"
    text = str(err)
    return text.split(marker, 1)[1].split("'", 1)[0] if marker in text else None


def unknown_argument_message(target: Any, target_name: str, key: str, name: str, value: Any) -> str:
    accepted = accepted_keywords(target)
    return (
        f"{key}.{name}={value!r}: {target_name} takes no argument {name}{did_you_mean(name, accepted, key)}. "
        f"Its arguments: {', '.join(accepted)}."
    )


def accepted_keywords(target: Any) -> list[str]:
    """The keyword arguments `target` takes, following `**kwargs` up the classes' __init__ methods
    (HybridParallel passes its **strategy_kwargs to ParallelStrategy)."""
    if isinstance(target, type):
        initializers = [cls.__dict__["__init__"] for cls in target.__mro__ if "__init__" in cls.__dict__]
    else:
        initializers = [target]
    names: list[str] = []
    for initializer in initializers:
        parameters = inspect.signature(initializer).parameters.values()
        named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names += [name for name in named if name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------- types


def check_types(target: Any, target_name: str, kwargs: dict[str, Any], key: str) -> None:
    """Refuses a value that does not fit the annotation of the argument it goes to."""
    initializer = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(initializer)
        defaults = {n: p.default for n, p in inspect.signature(initializer).parameters.items()}
    except (NameError, TypeError, ValueError):
        return  # annotations that cannot be evaluated here: the constructor checks what it checks
    for name, value in kwargs.items():
        if name in hints and not fits(value, hints[name]):
            default = defaults.get(name, inspect.Parameter.empty)
            example = "" if default is inspect.Parameter.empty else f", e.g. {key}.{name}={default!r} (the default)"
            raise ConfigError(
                f"{key}.{name}={value!r} is a {type(value).__name__}, but {target_name} takes "
                f"{describe(hints[name])} for {name}. Give a value of that type{example}."
            )


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`; forms this does not know are let through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in _UNIONS:
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # an int fits a float (PEP 484), a bool fits neither
        allowed = int if hint is int else (int, float)
        return isinstance(value, allowed) and not isinstance(value, bool)
    cls = origin or hint
    if not isinstance(cls, type):
        return True
    if not isinstance(value, cls):
        return False
    return not (cls is list and args) or all(fits(item, args[0]) for item in value)


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return " or ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
