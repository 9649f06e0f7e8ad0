"""The model registry: every CausalLM subclass with a `model_type` in this package's modules, by model_type.

A new family is a new module here (and its test); nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from shard.models.base import CausalLM, head_dim_of

__all__ = ["MODELS", "CausalLM", "check_model_type", "head_dim_of", "model_class"]

# Architectures transformers serves under these model types that Loom does not compute, and what sets them apart.
UNSUPPORTED = {
    "deepseek_v2": "multi-head latent attention (MLA)",
    "deepseek_v3": "multi-head latent attention (MLA)",
    "deepseek_v32": "multi-head latent attention (MLA) with sparse attention",
    "qwen3_next": "hybrid linear attention (Gated DeltaNet)",
}


def _discover() -> dict[str, type[CausalLM]]:
    found: dict[str, type[CausalLM]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, CausalLM) and obj.__module__ == module.__name__ \
                    and obj.model_type:
                if obj.model_type in found:
                    raise RuntimeError(f"model_type {obj.model_type!r} is served by both {found[obj.model_type]} "
                                       f"and {obj}")
                found[obj.model_type] = obj
    return found


MODELS: dict[str, type[CausalLM]] = _discover()


def check_model_type(model_type: str) -> None:
    """Raises naming `model_type` (and what Loom lacks for it, where known) unless a family serves it."""
    if model_type not in MODELS:
        why = f" ({UNSUPPORTED[model_type]})" if model_type in UNSUPPORTED else ""
        raise ValueError(f"unsupported model_type {model_type!r}{why}; supported: {', '.join(sorted(MODELS))}")


def model_class(config) -> type[CausalLM]:
    """The family serving `config`; an unknown model_type is a start-up error naming it."""
    check_model_type(config.model_type)
    return MODELS[config.model_type]
