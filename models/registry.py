"""One registry for every trainable head: `HEADS[name](config) -> nn.Module`.

Weights are saved as safetensors with the resolved config beside them:

    <dir>/model.safetensors     the state dict
    <dir>/config.json           {"head": name, "config": {...}}   (config.to_dict())
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .affinity.config import AffinityConfig
from .affinity.model import build_affinity_head

HEADS: dict[str, Callable[[Any], nn.Module]] = {"affinity": build_affinity_head}
CONFIGS: dict[str, type] = {"affinity": AffinityConfig}

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _check_name(name: str) -> None:
    if name not in HEADS:
        raise KeyError(f"unknown head {name!r}; known heads: {', '.join(sorted(HEADS))}")


def head_name(config: Any) -> str:
    """The registry name of a config instance."""
    for name, cls in CONFIGS.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"no head is registered for config type {type(config).__name__}")


def build_config(name: str, data: Mapping[str, Any] | None = None) -> Any:
    """A head's config from a YAML/JSON mapping (defaults when `data` is None)."""
    _check_name(name)
    cls = CONFIGS[name]
    return cls() if data is None else cls.from_dict(data)


def build_head(name: str, config: Any) -> nn.Module:
    """Build head `name` from its config dataclass (or a plain mapping of its fields)."""
    _check_name(name)
    if isinstance(config, Mapping):
        config = build_config(name, config)
    if not isinstance(config, CONFIGS[name]):
        raise TypeError(
            f"head {name!r} needs a {CONFIGS[name].__name__}, got {type(config).__name__}"
        )
    return HEADS[name](config)


def save_head(module: nn.Module, config: Any, directory: str | Path) -> Path:
    """Write `module`'s weights and `config` into `directory` (created if needed); returns it."""
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
    """Rebuild a head saved by `save_head`; returns (module in eval mode, config)."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a saved head: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    meta = json.loads(cfg_path.read_text())
    name = meta.get("head")
    _check_name(name)
    config = build_config(name, meta["config"])
    module = build_head(name, config)
    module.load_state_dict(load_file(str(w_path), device=device), strict=True)
    return module.to(device).eval(), config
