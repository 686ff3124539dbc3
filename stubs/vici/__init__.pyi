# Only the submodule btns-vici imports is declared (stubs/README.md).
