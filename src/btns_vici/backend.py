"""A selected backend: the core's one handle on an IKE daemon and its data plane.

:class:`Backend` calls the hooks of :mod:`btns_vici.hookspecs` on exactly one
plugin and adds the rule every backend shares: a flow is protected only when the
daemon has an installed CHILD_SA for it AND the data plane proves it carries it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy

from . import knownpeers, netns
from .core.constants import AuthMethod
from .core.errors import BackendError, NotSupportedError
from .core.records import ChildSA, IkeSA, NotCarried, Protection, SocketView
from .core.selectors import Flow


@dataclass(frozen=True)
class BackendInfo:
    """A backend plugin's name (as registered), daemon and one-line summary. Not in the draft: which
    "key management or IPsec module of the host" (draft section 2.3.1) answers for the pTokens."""

    name: str
    daemon: str
    summary: str


@dataclass(frozen=True)
class Capabilities:
    """What a backend can establish and prove: the authentication methods (draft section 2.1.2,
    Figure 4), modes (``tunnelMode``, section 2.3.2), its data plane, whether it enforces pTokens."""

    auth_methods: frozenset[AuthMethod]
    modes: frozenset[str]  # {"TUNNEL", "TRANSPORT"}
    dataplane: str  # "kernel-xfrm" | "kernel-libipsec" | "unknown"
    enforce: bool = False


@dataclass(frozen=True)
class Enforcement:
    """What set_socket_pToken (draft section 2.3.3, Figure 9) arranged: the daemon's connection and the
    data-plane guard."""

    connection: str
    dataplane_guard: str
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SAEvent:
    """A change of the IKE daemon's SAs, for latches and watchers. Not in the draft: it is what makes a
    pToken read once (section 2.3.3) stale (README "Connection latching")."""

    kind: str  # "ike-up", "ike-down", "child-up", "child-down", "ike-rekey", "child-rekey", "reset"
    ike_name: str = ""
    child_name: str = ""
    ike_uniqueid: str = ""
    child_uniqueid: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


class Backend:
    """One backend plugin with its options, e.g. ``Backend(pm, "strongswan", {...})``: the "key management
    or the IPsec module of the host" that pTokens are handles to (draft section 2.3.1)."""

    def __init__(self, pm: pluggy.PluginManager, name: str, options: Mapping[str, str]) -> None:
        if pm.get_plugin(name) is None:
            raise BackendError(f"no backend named {name!r} is installed")
        self.name = name
        self.options: Mapping[str, str] = MappingProxyType(dict(options))
        others = [p for n, p in pm.list_name_plugin() if n != name and p is not None]
        self._pm = pm
        self._others = others
        self._callers: dict[str, Any] = {}
        st = os.stat("/proc/thread-self/ns/net")
        self._own_netns = (st.st_dev, st.st_ino)

    @property
    def netns_id(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the namespace this backend speaks for: option ``netns``, else the
        one the process was in when the backend was made; None when that namespace is gone."""
        name = self.options.get("netns")
        if not name:
            return self._own_netns
        try:
            st = os.stat(netns.netns_path(name))
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _call(self, hook: str, **kwargs: Any) -> Any:  # pluggy: Any; callers annotate the hookspec type
        caller = self._callers.get(hook)
        if caller is None:
            caller = self._callers[hook] = self._caller(hook)
        return caller(options=self.options, **kwargs)

    def _caller(self, hook: str) -> Callable[..., Any]:
        """How to call ``hook`` on this backend alone, exactly as pluggy would.

        A firstresult hook this plugin implements once, without wrappers, is called directly
        (what pluggy's ``_multicall`` does with one implementation: its arguments by name, its
        result). pluggy's subset caller would filter every installed plugin's implementations
        on each call, about 1 us more per call for each other installed backend. Anything
        else goes through that subset caller.
        """
        caller = getattr(self._pm.hook, hook)
        impls = [i for i in caller.get_hookimpls() if i.plugin_name == self.name]
        firstresult = bool(caller.spec is not None and caller.spec.opts.get("firstresult"))
        if firstresult and len(impls) == 1 and not (impls[0].hookwrapper or getattr(impls[0], "wrapper", False)):
            function, names = impls[0].function, tuple(impls[0].argnames)

            def direct(**kw: Any) -> Any:
                return function(*[kw[n] for n in names])

            return direct
        return self._pm.subset_hook_caller(hook, remove_plugins=self._others)

    def probe(self) -> bool:
        return bool(self._call("btns_probe"))

    def capabilities(self) -> Capabilities:
        caps: Capabilities | None = self._call("btns_capabilities")
        if caps is None:
            raise BackendError(f"backend {self.name!r} does not report capabilities")
        return caps

    def list_sas(self) -> list[IkeSA]:
        sas: list[IkeSA] | None = self._call("btns_list_sas")
        if sas is None:
            raise BackendError(f"backend {self.name!r} cannot list SAs")
        return sas

    def find_sa(self, flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        found: tuple[IkeSA, ChildSA] | None = self._call("btns_find_sa", flow=flow)
        return found

    def protect(self, view: SocketView) -> Protection | NotCarried:
        """The verified protection of the socket ``view``: daemon SA and data-plane proof, or why not.

        The socket must live in the namespace this backend speaks for, the daemon must
        have an installed CHILD_SA covering its flow, and the data plane must carry THIS
        socket's packets through it (README "Socket-exact truth").
        """
        mine = self.netns_id
        if mine is None:
            return NotCarried(f"the network namespace {self.options.get('netns')!r} of backend {self.name} is gone")
        if view.netns != mine:
            theirs = f"net:[{view.netns[1]}]" if view.netns else "an unreadable namespace"
            return NotCarried(
                f"the socket lives in {theirs}, not in net:[{mine[1]}] whose IKE daemon and data plane "
                f"backend {self.name} speaks for"
            )
        flow = view.flow
        found = self.find_sa(flow)
        if found is None:
            return NotCarried(f"{self.name} has no installed CHILD_SA covering {flow}")
        ike, child = found
        verdict = self._call("btns_verify_dataplane", flow=flow, ike_sa=ike, child_sa=child, view=view)
        if verdict is None:
            return NotCarried(f"the data plane gives no proof that CHILD_SA {child.name}#{child.uniqueid} carries it")
        if isinstance(verdict, NotCarried):
            return verdict
        return Protection(flow=flow, ike_sa=knownpeers.reported(ike), child_sa=child, proof=verdict)

    def find_protection(self, flow: Flow) -> Protection | None:
        """:meth:`protect` for a bare flow, judged as an unbound, unmarked socket of this namespace."""
        verdict = self.protect(SocketView(flow=flow, netns=self.netns_id))
        return verdict if isinstance(verdict, Protection) else None

    def enforce(self, sock: Any, ptoken: Any) -> Enforcement:
        result: Enforcement | None = self._call("btns_enforce", sock=sock, ptoken=ptoken)
        if result is None:
            raise NotSupportedError(f"backend {self.name!r} cannot enforce pTokens")
        return result

    def establish(self, flow: Flow, ptoken: Any) -> str:
        name: str | None = self._call("btns_establish", flow=flow, ptoken=ptoken)
        if name is None:
            raise NotSupportedError(f"backend {self.name!r} cannot establish SAs on demand")
        return name

    def serve(self, local_addr: Any, ptoken: Any) -> str:
        name: str | None = self._call("btns_serve", local_addr=local_addr, ptoken=ptoken)
        if name is None:
            raise NotSupportedError(f"backend {self.name!r} cannot accept peers on demand")
        return name

    def release(self, name: str) -> bool:
        """Unload connection ``name`` that :meth:`establish`/:meth:`serve` loaded (False: cannot)."""
        return bool(self._call("btns_release", name=name))

    def watch(self, callback: Callable[[SAEvent], None]) -> Callable[[], None]:
        stop: Callable[[], None] | None = self._call("btns_watch", callback=callback)
        if stop is None:
            raise NotSupportedError(f"backend {self.name!r} has no event stream")
        return stop
