"""The registry of trainable heads (timm's ``register_model`` pattern).

A head module declares its plugin class and registers it where it is defined::

    @register_head
    class MyHead(Head):
        name = "my_head"
        config_cls = MyConfig
        ...

``samcp train --head NAME`` and ``samcp predict`` find heads here and never name one. The heads that
ship with samcp register when their package is imported; :func:`_load_builtin_heads` imports them
on first use, and heads of other distributions register through the ``samcp.heads`` entry-point
group (the value is a module to import).

Weights are saved as safetensors with the resolved config beside them:

    <dir>/model.safetensors     the state dict
    <dir>/config.json           {"head": name, "config": {...}}   (config.to_dict())
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .heads import Head

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: modules whose import registers samcp's own heads
BUILTIN_HEAD_MODULES = (
    "samcp.models.affinity.plugin",
    "samcp.models.possam.plugin",
    "samcp.models.costagg.plugin",
    "samcp.models.ovsam.plugin",
    "samcp.models.sam_mi.plugin",
    "samcp.models.esc_net.plugin",
)
ENTRY_POINT_GROUP = "samcp.heads"

_HEADS: dict[str, Head] = {}
_loaded = False


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: registers a Head subclass under ``cls.name`` (one instance is kept)."""
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise TypeError(f"register_head takes a Head subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    old = _HEADS.get(cls.name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ValueError(f"head {cls.name!r} is already registered by {type(old).__qualname__}")
    _HEADS[cls.name] = cls()
    return cls


def _load_builtin_heads() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_HEAD_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value)


def list_heads() -> list[str]:
    """Names of every registered head, sorted."""
    _load_builtin_heads()
    return sorted(_HEADS)


def get_head(name: str) -> Head:
    """The plugin registered as ``name``.

    Raises:
        KeyError: no such head (the message lists the known ones).
    """
    _load_builtin_heads()
    if name not in _HEADS:
        raise KeyError(f"unknown head {name!r}; known heads: {', '.join(sorted(_HEADS))}")
    return _HEADS[name]


def head_name(config: Any) -> str:
    """The registry name of a config instance."""
    _load_builtin_heads()
    for name, head in _HEADS.items():
        if type(config) is head.config_cls:
            return name
    raise TypeError(f"no head is registered for config type {type(config).__name__}")


def build_config(name: str, data: Mapping[str, Any] | None = None) -> Any:
    """A head's config from a YAML/JSON mapping (defaults when ``data`` is None)."""
    cls = get_head(name).config_cls
    return cls() if data is None else cls.from_dict(data)


def build_head(name: str, config: Any) -> nn.Module:
    """Build head ``name`` from its config dataclass (or a plain mapping of its fields)."""
    head = get_head(name)
    if isinstance(config, Mapping):
        config = build_config(name, config)
    if not isinstance(config, head.config_cls):
        raise TypeError(
            f"head {name!r} needs a {head.config_cls.__name__}, got {type(config).__name__}"
        )
    return head.build(config)


def save_head(module: nn.Module, config: Any, directory: str | Path) -> Path:
    """Write ``module``'s weights and ``config`` into ``directory`` (created if needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    name = head_name(config)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"head": name})
    tmp.replace(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(
        json.dumps({"head": name, "config": config.to_dict()}, indent=2, sort_keys=True)
    )
    return out


def load_head(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild a head saved by :func:`save_head`; returns (module in eval mode, config)."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a saved head: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    meta = json.loads(cfg_path.read_text())
    name = meta.get("head")
    saved = {**get_head(name).legacy_defaults, **meta["config"]}
    config = build_config(name, saved)
    module = build_head(name, config)
    module.load_state_dict(load_file(str(w_path), device=device), strict=True)
    return module.to(device).eval(), config
