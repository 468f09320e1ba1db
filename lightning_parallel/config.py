"""Composable configs without Hydra, and objects built from their `_target_` keys.

`compose` reads a primary YAML file whose `defaults:` list names one option of each config
group (`- strategy: 3d` means `strategy/3d.yaml` beside it, placed under the key `strategy`),
as Hydra composes the same files. Command-line words follow Hydra's basic syntax:
`strategy=dp` picks another option of a group, `strategy.sharding=full` overrides a key that
exists, `+strategy.loss_parallel=true` adds one.

`instantiate` builds a node's `_target_` with its other keys as keyword arguments, after
checking every value against the target's annotations, so a wrong key, type or value fails in
the launching process, before any worker starts, with a message naming the key and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

SELF = "_self_"
_ABSENT = object()
_UNIONS = (Union, types.UnionType)


class ConfigError(ValueError):
    """A config that cannot run. The message names the key, the bad value and the fix."""


# ------------------------------------------------------------------------------ composing


def compose(primary: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The primary config with its defaults list resolved and the command-line overrides applied."""
    primary = Path(primary)
    root = OmegaConf.load(primary)
    root.pop("hydra", None)  # Hydra's own settings, for runs under Hydra only
    defaults = parse_defaults(root.pop("defaults", []), primary)
    choices, assignments = split_overrides(overrides, {group for group, _ in defaults if group != SELF})
    config = OmegaConf.create()
    for group, option in defaults:
        if group == SELF:
            config = OmegaConf.merge(config, root)
        else:
            config = OmegaConf.merge(config, {group: load_option(primary.parent, group, choices.get(group, option))})
    for assignment in assignments:
        config = apply_override(config, assignment)
    return config


def parse_defaults(entries: Iterable, primary: Path) -> list[tuple[str, str]]:
    """[(group, option), ...] in merge order; `_self_` (the primary file's own keys) is last unless listed."""
    defaults = []
    for entry in entries:
        if entry == SELF:
            defaults.append((SELF, SELF))
        elif isinstance(entry, DictConfig) and len(entry) == 1:
            (group, option), = entry.items()
            defaults.append((str(group), str(option)))
        else:
            raise ConfigError(
                f"{primary}: the defaults entry {entry!r} is not understood here; use `- group: option` or `- _self_`."
            )
    if (SELF, SELF) not in defaults:
        defaults.append((SELF, SELF))
    return defaults


def split_overrides(overrides: Sequence[str], groups: set[str]) -> tuple[dict[str, str], list[str]]:
    """Group choices ({group: option}) and key assignments, in command-line order."""
    choices, assignments = {}, []
    for word in overrides:
        key, equals, value = word.partition("=")
        if not equals:
            raise ConfigError(f"{word!r} is not an override: write key=value (e.g. trainer.devices=2) or group=option.")
        if key in groups:
            choices[key] = value
        else:
            assignments.append(word)
    return choices, assignments


def load_option(config_dir: Path, group: str, option: str) -> DictConfig:
    path = config_dir / group / f"{option}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise ConfigError(f"{group}={option}: there is no {path}. Choose one of: {', '.join(options)}.")
    return OmegaConf.load(path)


def apply_override(config: DictConfig, assignment: str) -> DictConfig:
    """Sets one `key=value` (value parsed as YAML). The key must exist, unless written `+key=value`."""
    key, _, value = assignment.partition("=")
    adding = key.startswith("+")
    key = key.lstrip("+")
    if not adding and OmegaConf.select(config, key, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
        raise ConfigError(unknown_key_message(config, key, value))
    return OmegaConf.merge(config, OmegaConf.from_dotlist([f"{key}={value}"]))


def unknown_key_message(config: DictConfig, key: str, value: str) -> str:
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key) if parent_key else config
    siblings = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    where = f"under {parent_key}" if parent_key else "at the top level"
    return (
        f"{key}={value}: the config has no key {key}{did_you_mean(name, siblings, parent_key)}. "
        f"Keys {where}: {', '.join(siblings) or 'none'}. To add a new key, write +{key}={value}."
    )


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""


# --------------------------------------------------------------------------- instantiating


def instantiate(config: DictConfig | dict, key: str, **extra: Any) -> Any:
    """Builds `config._target_(**other keys, **extra)`. `key` is the config's path, for messages."""
    kwargs = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    target_name = kwargs.pop("_target_", None)
    if target_name is None:
        raise ConfigError(f"{key} has no _target_: add `_target_: package.module.Class` to say what it builds.")
    target = import_target(target_name, key)
    kwargs = {name: build_nested(value, f"{key}.{name}") for name, value in kwargs.items()}
    check_types(target, target_name, kwargs, key)
    try:
        return target(**kwargs, **extra)
    except TypeError as err:
        unknown = unexpected_keyword(err)
        if unknown in kwargs:
            raise ConfigError(unknown_argument_message(target, target_name, key, unknown, kwargs[unknown])) from err
        raise ConfigError(f"In {key} ({target_name}): {err}") from err
    except ValueError as err:  # LayoutError among them
        raise ConfigError(f"In {key} ({target_name}): {err}") from err


def build_nested(value: Any, key: str) -> Any:
    """Values that are configs with a `_target_` of their own (e.g. a logger) are built too."""
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, key)
    if isinstance(value, list):
        return [build_nested(item, f"{key}[{i}]") for i, item in enumerate(value)]
    return value


def import_target(name: str, key: str) -> Any:
    """`package.module.Attr` (or `module.Class.attr`) as an object."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute, _ABSENT)
            if found is _ABSENT:
                break
        else:
            return found
    raise ConfigError(
        f"{key}._target_={name!r} cannot be imported: write it as package.module.Class, with the module on the "
        "Python path (the example scripts put examples/ there, so gpt.GPT is examples/gpt.py's GPT)."
    )


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
