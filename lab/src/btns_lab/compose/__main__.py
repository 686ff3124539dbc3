"""``python -m btns_lab.compose``: the two-peer demo on the compose testbed."""

from .driver import main

main()
