"""The plugin manager: built-in backends are registered exactly like third-party ones.

Third-party backends declare an entry point in group ``btns_vici.backends``
whose object is a plugin (module or instance) implementing
:mod:`btns_vici.hookspecs`; it is registered under the entry point's name.
A built-in name wins over an entry point of the same name, so a backend asked for by a
built-in name is served without scanning the entry points (importlib.metadata reads every
installed distribution's metadata: tens of ms at each start of ``btns``).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Mapping

import pluggy

from . import hookspecs
from .backend import Backend, BackendInfo
from .core.errors import BackendError, BtnsError, DaemonTimeoutError, specificity

ENTRY_POINT_GROUP = "btns_vici.backends"

#: Built-in backends: (name, "module:attribute") loaded like an entry point.
BUILTIN_BACKENDS = (("strongswan", "btns_vici.strongswan.plugin:plugin"),)

_pm: pluggy.PluginManager | None = None
_builtin_pm: pluggy.PluginManager | None = None


def _load(spec: str) -> object:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _with_builtins() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, spec in BUILTIN_BACKENDS:
        pm.register(_load(spec), name=name)
    return pm


def _builtin_manager() -> pluggy.PluginManager:
    """The full manager when it exists, else one with the built-in backends alone (no entry-point scan)."""
    global _builtin_pm
    if _pm is not None:
        return _pm
    if _builtin_pm is None:
        _builtin_pm = _with_builtins()
    return _builtin_pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-ins and entry points registered."""
    global _pm
    if _pm is None:
        from importlib.metadata import entry_points

        pm = _with_builtins()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is None:
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken third-party plugin must not take the library down
                    warnings.warn(
                        f"btns_vici: backend plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                pm.register(plugin, name=ep.name)
        _pm = pm
    return _pm


def backends() -> list[BackendInfo]:
    """Every installed backend, built-in first (each a key management of draft section 2.3.1)."""
    return list(get_plugin_manager().hook.btns_backend_info())[::-1]


#: How long the default selection waits for all probes together, seconds (each backend's probe
#: has its own, shorter deadline; this bounds a third-party probe that ignores it).
SELECTION_TIMEOUT = 3.0


def _probe_all(
    infos: list[BackendInfo], pm: pluggy.PluginManager, opts: Mapping[str, str]
) -> list[tuple[Backend | None, bool, BaseException | None]]:
    """Probe every backend at once, each in its own thread; results in ``infos`` order.

    A probe still running after :data:`SELECTION_TIMEOUT` counts as timed out (its thread
    is a daemon thread and is left to finish on its own).
    """
    results: list[tuple[Backend | None, bool, BaseException | None]] = [
        (None, False, DaemonTimeoutError(f"backend {i.name!r}: probe did not finish within {SELECTION_TIMEOUT:g} s"))
        for i in infos
    ]
    done = threading.Event()
    remaining = [len(infos)]
    lock = threading.Lock()

    def run(i: int, info: BackendInfo) -> None:
        backend = None
        out: tuple[Backend | None, bool, BaseException | None]
        try:
            backend = Backend(pm, info.name, opts)
            out = (backend, bool(backend.probe()), None)
        except Exception as exc:
            out = (backend, False, exc)
        with lock:
            results[i] = out
            remaining[0] -= 1
            if not remaining[0]:
                done.set()

    threads = [
        threading.Thread(target=run, args=(i, info), name=f"btns-probe-{info.name}", daemon=True)
        for i, info in enumerate(infos)
    ]
    for t in threads:
        t.start()
    if infos:
        done.wait(SELECTION_TIMEOUT)
    with lock:
        return list(results)


def get_backend(name: str | None = None, options: Mapping[str, str] | None = None) -> Backend:
    """Select a backend: ``name``, else ``$BTNS_BACKEND``, else the first whose daemon answers. Not in
    the draft, which leaves the key management (section 2.3.1) to the host.

    The default selection probes every installed backend in parallel (each with its short
    probe deadline) and takes the first, in :func:`backends` order, that answers. When none
    does it raises the most specific failure among them (EACCES over EPROTO over ETIMEDOUT
    over ECONNREFUSED, see :func:`btns_vici.core.errors.specificity`), naming every backend tried.
    """
    opts = dict(options or {})
    chosen = name or os.environ.get("BTNS_BACKEND")
    if chosen:
        builtin = any(chosen == n for n, _ in BUILTIN_BACKENDS)
        return Backend(_builtin_manager() if builtin else get_plugin_manager(), chosen, opts)
    pm = get_plugin_manager()
    infos = backends()
    results = _probe_all(infos, pm, opts)
    for backend, ok, _ in results:
        if ok and backend is not None:
            return backend
    reasons = []
    worst: BaseException | None = None
    for info, (_, _, exc) in zip(infos, results, strict=True):
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (exc or "no daemon")
        reasons.append(f"{info.name}: {why}")
        if isinstance(exc, OSError) and (worst is None or specificity(exc) > specificity(worst)):
            worst = exc
    tried = "; ".join(reasons) or "none installed"
    cls = type(worst) if isinstance(worst, BtnsError) else BackendError
    err = worst.errno if isinstance(worst, OSError) and worst.errno else None
    raise cls(f"no IKE daemon answers (tried backends: {tried})", err)
