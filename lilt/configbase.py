"""The machinery under every lilt config: typed dataclass fields with help, validation, a dict/JSON/YAML round trip.

Each config is a dataclass whose fields carry `metadata={"help": ...}` (as peft does), so the CLI, the
docs and error messages all read the same text. `from_dict` refuses unknown keys and names the closest
accepted one, because a misspelt key that is silently ignored is the most expensive bug a training
recipe can have. Numbers must be finite: a NaN learning rate is a typo, not a setting. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, TypeVar

import yaml

from .errors import ConfigError, did_you_mean

T = TypeVar("T", bound="ConfigBase")


def knob(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text; mutable defaults become factories."""
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _number(value: Any, tp: type, where: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, str):
        # PyYAML reads '1e-4' (no dot) as a string; accept what a person clearly meant as a number.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number.")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting nested configs and lists."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, typing.Hashable) or value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}."
                              + did_you_mean(str(value), map(str, choices)))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = (typing.get_args(tp) or (Any, Any))
        return {_coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp in (int, float):
        return _number(value, tp, where)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


@dataclass
class ConfigBase:
    """Base of every lilt config: typed fields, validation, dict/JSON/YAML round trip."""

    # How error messages join a config's location and a key ('TrainConfig.lr', or 'recipe.yaml:train'),
    # and what they call a key ('key', or 'section' for a recipe's top level).
    key_separator: ClassVar[str] = "."
    key_noun: ClassVar[str] = "key"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{type(self).__name__}.{f.name}"
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], where))
        self.validate()

    def validate(self) -> None:
        """Check cross-field constraints; raise ConfigError naming the bad value."""

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
        """Build from a mapping, refusing unknown keys with a 'did you mean' hint."""
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"{where}: unknown {cls.key_noun} {key!r}.{did_you_mean(str(key), names)} "
                                  f"Accepted {cls.key_noun}s: {', '.join(names)}.")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}.")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{where}{cls.key_separator}{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as err:
            # validate() names the field; say which file or section it came from too.
            message = str(err)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON-compatible values (nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, (list, tuple)):
                value = [v.to_dict() if isinstance(v, ConfigBase) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON text, and write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            from ._io import write_text
            write_text(path, text)
        return text

    @classmethod
    def from_file(cls: type[T], path: str | Path, section: str | None = None) -> T:
        """Load from a JSON or YAML file, optionally from one top-level section."""
        data = read_mapping(path)
        where = str(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path}: no '{section}:' section (found: {', '.join(map(str, data)) or 'nothing'}).")
            data, where = data[section], f"{path}:{section}"
        return cls.from_dict(data, where=where)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping (never executes anything: safe_load / json only)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give the YAML/JSON file in it.")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}).") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"{path}: not valid {kind}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set `section.key=value` pairs (values parsed as YAML: 3, 1e-4, [en, sw], {sw: 100}) in a recipe mapping."""
    for index, item in enumerate(overrides):
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=200 or data.langs=[en,sw]).")
        whole = _shell_split(overrides, index)
        if whole is not None:
            raise ConfigError(f"override {item!r} was cut at a space by the shell. Quote the whole override so it "
                              f"stays one word: '{whole}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value. Quote the whole override so the shell "
                              "keeps it one word, e.g. 'data.pairs_per_lang={sw: 300}'.") from None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section.")
        node[leaf] = value
    return data


def _shell_split(overrides: typing.Sequence[str], index: int) -> str | None:
    """The override the user typed when the shell cut it at spaces ('a={sw:' '300}'), else None."""
    def open_brackets(text: str) -> int:
        return sum(text.count(c) for c in "{[") - sum(text.count(c) for c in "}]")

    pieces = [overrides[index]]
    rest = list(overrides[index + 1:])
    while open_brackets(" ".join(pieces)) > 0 and rest and "=" not in rest[0].split(":")[0]:
        pieces.append(rest.pop(0))
    return " ".join(pieces) if len(pieces) > 1 else None
