"""The strongSwan backend: charon over VICI, data plane kernel-libipsec or kernel XFRM.

Modules: :mod:`.session` (one VICI command connection with reconnect),
:mod:`.events` (a non-blocking VICI event stream), :mod:`.parse` (VICI replies ->
:mod:`btns_vici.core.records`), :mod:`.index` (an SA index fed by events),
:mod:`.plugin` (the pluggy hooks).
"""
