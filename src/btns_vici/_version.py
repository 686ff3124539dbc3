"""The one version of btns-vici: pyproject.toml reads it (setuptools dynamic), so do the package,
``btns --version`` and the C ABI's btns-ipsec.pc. Imports nothing."""

__version__ = "0.1.0"
