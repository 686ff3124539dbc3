"""The lab's ``btns`` commands (``testbed``, ``demo``), added through the entry point group ``btns_vici.cli``."""
