"""The two-peer demo on the compose testbed (docker/docker-compose.yml), one job per module.

The same demo as :mod:`btns_lab.demo`, with each peer in its own container:

* on the host, this module takes the compose testbed's lock, brings the testbed up with
  ``BTNS_CONN=no`` (each container runs charon only; the library makes every connection)
  through ``scripts/compose/up.sh`` (podman + podman-compose) or ``docker compose``,
  runs the two peer programs below inside the containers, prints both ends' pTokens and
  iTokens with the agreement checks of the netns demo, and takes the testbed down
  (unless ``--keep``). Exit 0 only when every check passes.
* inside the containers (``python -m btns_lab.compose.peer server|client``): each
  end has a host key made on first use in ``/var/lib/btns-vici`` (:mod:`btns_vici.hostkey`),
  publishes its public half on the shared volume and uses the directory holding the
  peer's as its peer-key directory (BTNS: raw keys exchanged out of band). bob's
  listening socket and alice's socket get a pToken demanding encryption (privacy at
  least LEVEL_MEDIUM) and BTNS (``set_socket_ptoken``); ``listen``/``accept``/``connect``
  have charon negotiate and verify the SA. Each end prints its pToken as one JSON line.

The data plane is ``$BTNS_DATAPLANE`` (``xfrm``: kernel ESP, transport mode;
``libipsec``: userspace ESP, tunnel mode); by default ``xfrm`` when the host kernel can do
ESP, else ``libipsec``.

Exit codes: 0 every check passed; 1 a check or the connection failed; 2 the demo cannot run
here (not root, no TUN, no checkout, no usable engine); 3 the compose testbed did not come up.

The jobs: :mod:`.settings` (the testbed's names, addresses and exit codes), :mod:`.tokens_json`
(pTokens from the containers to the host), :mod:`.peer` (one end, inside its container),
:mod:`.engine` (podman or docker, the compose project, its lock) and :mod:`.driver` (the
host side: up, both ends, the checks, down; ``python -m btns_lab.compose``).
"""
