"""The plugin manager: built-in backends are registered exactly like third-party ones.

Third-party backends declare an entry point in group ``btns_vici.backends``
whose object is a plugin (module or instance) implementing
:mod:`btns_vici.hookspecs`; it is registered under the entry point's name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .backend import Backend, BackendInfo
from .errors import BackendError

ENTRY_POINT_GROUP = "btns_vici.backends"

#: Built-in backends: (name, "module:attribute") loaded like an entry point.
BUILTIN_BACKENDS = (("strongswan", "btns_vici.strongswan.plugin:plugin"),)

_pm: pluggy.PluginManager | None = None


def _load(spec: str) -> object:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-ins and entry points registered."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for name, spec in BUILTIN_BACKENDS:
            pm.register(_load(spec), name=name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
        _pm = pm
    return _pm


def backends() -> list[BackendInfo]:
    """Every installed backend, built-in first."""
    return list(get_plugin_manager().hook.btns_backend_info())[::-1]


def get_backend(name: str | None = None, options: Mapping[str, str] | None = None) -> Backend:
    """Select a backend: ``name``, else ``$BTNS_BACKEND``, else the first whose daemon answers."""
    pm = get_plugin_manager()
    opts = dict(options or {})
    chosen = name or os.environ.get("BTNS_BACKEND")
    if chosen:
        return Backend(pm, chosen, opts)
    tried = []
    for info in backends():
        backend = Backend(pm, info.name, opts)
        if backend.probe():
            return backend
        tried.append(info.name)
    raise BackendError(f"no IKE daemon answers (tried backends: {', '.join(tried) or 'none'})")
