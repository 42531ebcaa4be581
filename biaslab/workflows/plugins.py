"""User code biaslab imports by name: estimator plugins, entry points and ``FILE:FUNCTION`` specs.

``import_source`` imports a Python file or a module (the current folder included); ``load_function`` returns
``FUNCTION`` from ``FILE_OR_MODULE:FUNCTION``; ``load_plugin`` and ``load_entry_points`` run the
``register_estimator`` calls of ``--plugin`` files and of installed packages (entry-point group
``biaslab.estimators``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..core.estimators import Estimator, EstimatorError, register_estimator, registered_estimators

#: entry-point group whose members register estimators (a function, an ``Estimator`` or a module).
ENTRY_POINT_GROUP = "biaslab.estimators"


class PluginError(ValueError):
    """A ``--plugin`` file or a ``biaslab.estimators`` entry point could not be loaded."""


def import_source(where: str, error: type[Exception] = PluginError, prefix: str = "") -> ModuleType:
    """Import ``where``: a Python file (a name ending in .py, or an existing path) or a module name, looked up in the
    current folder too (``check mine:k3`` finds mine.py). Failures raise ``error("<prefix>where: reason")``."""
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.is_file():
            raise error(f"{prefix}{where}: no such file")
        name = f"_biaslab_source_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise error(f"{prefix}{where}: not a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise error(f"{prefix}{where}: importing it raised {type(exc).__name__}: {exc}") from exc
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise error(f"{prefix}{where}: cannot import it ({type(exc).__name__}: {exc})") from exc
    finally:
        sys.path.remove(os.getcwd())


def load_plugin(spec: str) -> None:
    """Import ``spec`` (a .py file or a module name) so that its ``register_estimator`` calls take effect."""
    import_source(spec, PluginError, "--plugin ")


def load_entry_points() -> list[str]:
    """Register the estimators that installed packages declare in the entry-point group ``ENTRY_POINT_GROUP``.

    An entry point ``name = package.module:obj`` registers ``obj`` (a function or an ``Estimator``) under ``name``;
    one naming a module (``name = package.module``) is imported for its own ``register_estimator`` calls. Returns
    the names loaded. One that fails to load, or would replace an estimator of another name's owner, is skipped
    with a one-line warning on stderr.
    """
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, Estimator) or (callable(obj) and not isinstance(obj, type)):
                existing = registered_estimators().get(ep.name)
                if existing is None:
                    register_estimator(ep.name, obj)
                elif existing.fn is not getattr(obj, "fn", obj):
                    owner = getattr(existing.fn, "__module__", None) or "another module"
                    raise PluginError(f"the name {ep.name!r} is already registered by {owner}")
        except Exception as exc:
            error = PluginError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP}: {exc}")
            print(f"biaslab: warning: skipped {error}", file=sys.stderr)
            continue
        loaded.append(ep.name)
    return loaded


def load_function(spec: str) -> Callable:
    """``path/to/file.py:NAME`` or ``package.module:NAME`` -> the callable NAME."""
    if ":" not in spec:
        raise EstimatorError(f"expected MODULE_OR_FILE:FUNCTION, got {spec!r}")
    where, name = spec.rsplit(":", 1)
    module = import_source(where, EstimatorError)
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise EstimatorError(f"{where} defines no {name!r}; callables there: {', '.join(found) or 'none'}")
    if not callable(fn):
        raise EstimatorError(f"{where}:{name} is not callable")
    return fn
