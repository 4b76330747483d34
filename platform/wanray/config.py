"""Typed configuration: nested dataclasses, a YAML preset, `--set a.b=c` overrides.

Precedence is CLI override > YAML file > dataclass default. Every key must name a
field: an unknown key is a `ConfigError`, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from wanray.compat import REMOVED_KEYS
from wanray.errors import ConfigError
from wanray.sections import (
    CaptionConfig,
    DataConfig,
    EvalConfig,
    InferConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    UIConfig,
)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, f"{where}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = set(typing.get_args(tp)) - {Ellipsis}
        return origin(_coerce(v, item, f"{where}[]") for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        # a mapping goes to the union's dataclass arm (e.g. `LoraSource | str`), anything else to its first other arm
        tp = next((a for a in arms if isinstance(value, dict) == dataclasses.is_dataclass(a)), arms[0])
        return _coerce(value, tp, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    for key in unknown:
        if where + key in REMOVED_KEYS:
            raise ConfigError(f"config key {where + key!r} was removed: {REMOVED_KEYS[where + key]}")
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r} (valid: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in values.items()})


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`a.b=c` -> {"a": {"b": c}}, with c parsed as a YAML scalar (1, 0.5, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    tree: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        tree = {part: tree}
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; unknown keys raise ConfigError."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values)


def add_config_args(parser: argparse.ArgumentParser, default: str = "configs/tiny.yaml") -> None:
    parser.add_argument("--config", default=default, help=f"YAML preset (default {default})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.fps=24 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="also print Ray's own log lines and worker output")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
