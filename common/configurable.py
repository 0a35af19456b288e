"""Constructor arguments as the single source of truth.

Every module a config can name (tokenizers, quantizers, nets, losses, generators) inherits
``Configurable``: the arguments of its outermost ``__init__`` call are recorded, so ``obj.config``
is a plain ``{"class_path", "init_args"}`` dict (the same shape LightningCLI reads) and
``instantiate(obj.config)`` rebuilds an identical object. Checkpoints and exported folders store
this dict instead of pickled objects.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

ALLOWED_PREFIX = "vistok."


class Configurable:
    """Mixin: records the bound constructor arguments of the most-derived class."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    @property
    def config(self) -> dict[str, Any]:
        cls = type(self)
        args = {k: _plain(v, f"{cls.__name__}.{k}") for k, v in self._init_args.items()}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def _recording(init):
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        # The most-derived __init__ runs first and records; parents' wrappers see it and skip.
        if "_init_args" not in self.__dict__:
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    raise TypeError(f"{type(self).__name__}: *args cannot be recorded in a config")
                else:
                    recorded[name] = value
            object.__setattr__(self, "_init_args", recorded)
        init(self, *args, **kwargs)

    return wrapper


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, Configurable):
        return value.config
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{where} = {value!r} cannot be written to a config: constructor arguments of "
        "configurable modules must be JSON values or other configurable modules"
    )


def import_class(class_path: str):
    if not class_path.startswith(ALLOWED_PREFIX):
        raise ValueError(
            f"refusing to build {class_path!r}: configs may only name classes under "
            f"'{ALLOWED_PREFIX}' (a config from an untrusted source must not run arbitrary code)"
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot find class {class_path!r}: {e}") from e
    if not (inspect.isclass(obj) and issubclass(obj, Configurable)):
        raise ValueError(f"{class_path!r} is not a configurable vistok class")
    return obj


def instantiate(config: Any) -> Any:
    """Build objects from ``{"class_path", "init_args"}`` dicts, recursively."""
    if isinstance(config, dict) and "class_path" in config:
        extra = set(config) - {"class_path", "init_args"}
        if extra:
            raise ValueError(f"unexpected keys {sorted(extra)} next to class_path in a config")
        cls = import_class(config["class_path"])
        init_args = {k: instantiate(v) for k, v in (config.get("init_args") or {}).items()}
        try:
            return cls(**init_args)
        except TypeError as e:
            raise ValueError(f"cannot build {config['class_path']}: {e}") from e
    if isinstance(config, list):
        return [instantiate(v) for v in config]
    if isinstance(config, dict):
        return {k: instantiate(v) for k, v in config.items()}
    return config
