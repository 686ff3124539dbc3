"""btns-libreswan: a libreswan (pluto) backend for btns_vici, packaged as its own plugin.

The core never imports this package: it is found through the entry point
``libreswan = "btns_libreswan.plugin:plugin"`` in group ``btns_vici.backends``.
"""

__version__ = "0.1.0"
