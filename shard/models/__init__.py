"""The model registry: every CausalLM subclass with a `model_type` in this package's modules, by model_type.

A new family is a new module here (and its test); nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from shard.models.base import CausalLM, head_dim_of

__all__ = ["MODELS", "CausalLM", "head_dim_of", "model_class"]


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


def model_class(config) -> type[CausalLM]:
    """The family serving `config`; an unknown model_type is a start-up error naming it."""
    cls = MODELS.get(config.model_type)
    if cls is None:
        raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {', '.join(sorted(MODELS))}")
    return cls
