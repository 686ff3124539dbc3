"""The ``kernel-xfrm`` data plane: the kernel's own SAs and policies, proven by :mod:`btns_vici.xfrm`."""

from __future__ import annotations

from .. import xfrm as _xfrm
from ..core.records import ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView


def verify(view: SocketView, ike: IkeSA, child: ChildSA, netns_name: str | None) -> DataplaneProof | NotCarried:
    """The kernel's SAD/SPD snapshot and socket-policy census for this very socket (``xfrm.prove_socket``)."""
    return _xfrm.prove_socket(view, ike, child, netns_name)
