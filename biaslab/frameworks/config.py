"""A framework configuration as a user writes it: YAML/JSON files (nested or dotted keys) and ``--set KEY=VALUE``
items, flattened to the dotted keys a ``Preset`` reads."""

from __future__ import annotations

import json
from pathlib import Path

from .base import PresetError


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings -> dotted keys (``{"algorithm": {"use_kl_in_reward": true}}`` -> algorithm.use_kl_in_reward)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def load_config_file(path: str) -> dict[str, object]:
    """Settings from a YAML (or JSON) file, nested or with dotted keys."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetError(f"{path}: not valid JSON ({exc})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise PresetError("reading YAML needs PyYAML (pip install pyyaml); or pass a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PresetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return _flatten(data)


def parse_sets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise PresetError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
