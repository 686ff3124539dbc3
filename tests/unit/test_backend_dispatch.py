"""Backend calls the hooks of its own plugin only, as pluggy's subset caller would: by argument name,
firstresult, None when the plugin lacks the hook, and through pluggy itself for wrappers."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Generator, Mapping
from typing import Any

import pluggy

from btns_vici import hookspecs
from btns_vici.backend import Backend, Capabilities
from btns_vici.core.selectors import Flow
from btns_vici.hookspecs import hookimpl

FLOW = Flow(socket.IPPROTO_TCP, ipaddress.ip_address("10.0.0.1"), 1, ipaddress.ip_address("10.0.0.2"), 2)


class Mine:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl
    def btns_probe(self, options: Mapping[str, str]) -> bool:
        self.seen.append(dict(options))
        return True

    @hookimpl
    def btns_find_sa(self, flow: Flow) -> Any:  # a subset of the spec's arguments, as pluggy allows
        self.seen.append(flow)
        return None


class Other:
    @hookimpl
    def btns_probe(self, options: Mapping[str, str]) -> bool:
        raise AssertionError("another backend's hook was called")

    @hookimpl
    def btns_capabilities(self, options: Mapping[str, str]) -> Capabilities:
        raise AssertionError("another backend's hook was called")


class Wrapped:
    def __init__(self) -> None:
        self.wrapped = 0

    @hookimpl(wrapper=True)
    def btns_probe(self, options: Mapping[str, str]) -> Generator[None, bool, bool]:
        self.wrapped += 1
        result = yield
        return result


def _pm(**plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return pm


def test_only_its_own_plugin_answers_with_the_arguments_it_takes() -> None:
    mine = Mine()
    be = Backend(_pm(other=Other(), mine=mine), "mine", {"k": "v"})
    assert be.probe() is True
    assert be.find_sa(FLOW) is None
    assert mine.seen == [{"k": "v"}, FLOW]


def test_a_hook_the_plugin_lacks_answers_none() -> None:
    be = Backend(_pm(other=Other(), mine=Mine()), "mine", {})
    assert be._call("btns_capabilities") is None
    assert be._call("btns_list_sas") is None


def test_wrappers_go_through_pluggy() -> None:
    w = Wrapped()
    pm = _pm(w=w)
    assert Backend(pm, "w", {})._call("btns_probe") is None  # the wrapper ran around no implementation
    assert w.wrapped == 1
