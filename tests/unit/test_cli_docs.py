"""btns(1) and the completion scripts: generated from the parser, checked in under docs/, valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from btns_vici.cli.docgen import bash, manpage, zsh
from btns_vici.cli.parser import COMMANDS, build

DOCS = Path(__file__).resolve().parents[2] / "docs"
REGEN = "regenerate: btns man > docs/btns.1; btns completion bash|zsh > docs/completion/{btns.bash,_btns}"


@pytest.mark.parametrize(
    ("path", "make"), [("btns.1", manpage), ("completion/btns.bash", bash), ("completion/_btns", zsh)]
)
def test_checked_in_copy_is_current(path, make, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert (DOCS / path).read_text() == make(build()), REGEN


def test_manpage_is_clean_roff_and_documents_everything():
    text = manpage(build())
    assert shutil.which("groff"), "groff is needed (Debian: groff-base; scripts/setup.sh installs it)"
    proc = subprocess.run(["groff", "-man", "-ww", "-z"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    for name in COMMANDS:
        assert f".SS {name}\n" in text
    for word in ("EXIT STATUS", "\\-\\-version", "\\-\\-child", "\\-\\-listening", "BTNS_VICI_SOCKET"):
        assert word in text


def _complete(words: list[str]) -> list[str]:
    script = bash(build())
    quoted = " ".join(f"'{w}'" for w in words)
    cmd = f'{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _btns; printf "%s\\n" "${{COMPREPLY[@]}}"'
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_bash_completion_completes_commands_options_and_values():
    assert "sockets" in _complete(["btns", "so"]) and _complete(["btns", "sa"]) == ["sas"]
    opts = _complete(["btns", "sockets", "--"])
    assert {"--tcp", "--listening", "--json", "--netns"} <= set(opts)
    assert {"--ike", "--child"} <= set(_complete(["btns", "sas", "--"]))
    assert set(_complete(["btns", "completion", ""])) >= {"bash", "zsh"}
    assert _complete(["btns", "testbed", "st"]) == ["status"]
    assert "established" in _complete(["btns", "sockets", "state", "est"])
    assert _complete(["btns", "--backend", "str"]) == ["strongswan"]


def test_zsh_completion_parses():
    assert shutil.which("zsh"), "zsh is needed for this check (scripts/setup.sh installs it)"
    proc = subprocess.run(["zsh", "-n"], input=zsh(build()), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
