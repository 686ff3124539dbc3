"""The public API cites the part of draft-ietf-btns-c-api-04 it implements, and only parts that exist.

Every class and function that ``btns_vici.__all__`` and ``btns_vici.capi.__all__`` export names,
in its own docstring, a section or figure of the draft (or says that it is not in the draft, and
which part of the draft it serves). Every section and figure a docstring of the package cites is
one the draft has (its sections 1 to 6.2, figures 1 to 12), so a renumbering or a slip such as the
xfrm module's former "section 5" and "section 6" fails here.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import btns_vici
from btns_vici import capi

SRC = Path(btns_vici.__file__).resolve().parent

# The draft's table of contents (draft-ietf-btns-c-api-04).
SECTIONS = {
    "1": "Introduction",
    "2": "IPsec APIs",
    "2.1": "Identity Tokens",
    "2.1.1": "Creation of Identity Tokens",
    "2.1.2": "Attributes of Identity Tokens",
    "2.2": "Token Attributes",
    "2.3": "Protection Tokens",
    "2.3.1": "Creation of Protection Tokens",
    "2.3.2": "Attributes of Protection Tokens",
    "2.3.3": "Connection Oriented Communications",
    "2.3.4": "Datagram Oriented Communications",
    "2.3.5": "Equivalency of Protection Tokens",
    "2.3.6": "Duplication of Protection Tokens",
    "3": "Security Considerations",
    "4": "IANA Considerations",
    "5": "Acknowledgements",
    "6": "References",
}
FIGURES = range(1, 13)
# What the API implements: the sections of chapter 2 (3 to 6 are considerations and references).
IMPLEMENTED = {s for s in SECTIONS if s == "2" or s.startswith("2.")}

CITES = re.compile(r"\b(?:draft|sections?|figures?)\s+\d", re.I)
# "section 2.3.3", "sections 2.1.2 and 2.3.2", "draft 2.1", "draft section 2.2" -- not "RFC 7296 section 3.13.1",
# nor the abstract API's sections ("section 7 in [I-D.ietf-btns-abstract-api]").
SECTION_REF = re.compile(
    r"(?<!RFC )(?<!RFC \d{4} )\b(?:draft(?:-ietf-btns-c-api-04)?(?: sections?)?|sections?)\s+"
    r"(\d+(?:\.\d+)*(?:(?:,\s*|\s+and\s+)\d+(?:\.\d+)*)*)",
    re.I,
)
FIGURE_REF = re.compile(r"\bfigures?\s+(\d+(?:(?:,\s*|\s+and\s+)\d+)*)", re.I)
RFC_SECTION = re.compile(r"\bRFC\s*\d{4}\s+sections?\s+[\d.]+", re.I)


def exported() -> list[tuple[str, object]]:
    out = []
    for mod in (btns_vici, capi):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out.append((f"{mod.__name__}.{name}", obj))
    return out


def cited(text: str) -> tuple[set[str], set[int]]:
    text = RFC_SECTION.sub("", text)
    sections = {n for m in SECTION_REF.finditer(text) for n in re.findall(r"\d+(?:\.\d+)*", m.group(1))}
    figures = {int(n) for m in FIGURE_REF.finditer(text) for n in re.findall(r"\d+", m.group(1))}
    return sections, figures


@pytest.mark.parametrize(("name", "obj"), exported(), ids=[n for n, _ in exported()])
def test_every_export_cites_the_draft(name: str, obj: object) -> None:
    doc = obj.__doc__ or ""
    auto = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")  # a dataclass's generated one
    assert doc and not auto, f"{name} has no docstring of its own"
    assert CITES.search(doc), f"{name}'s docstring cites no section or figure of the draft: {doc[:120]!r}"
    sections, figures = cited(doc)
    assert sections <= IMPLEMENTED, f"{name} cites {sorted(sections - IMPLEMENTED)}, not sections of chapter 2"
    assert figures <= set(FIGURES), f"{name} cites figures {sorted(figures - set(FIGURES))}, the draft has 1-12"


def test_the_package_cites_only_sections_and_figures_the_draft_has() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"draft(?:-ietf-btns-c-api-04)?[^\n]{0,80}", text):
            sections, figures = cited(m.group(0))
            bad = sorted(s for s in sections if s not in SECTIONS)
            bad += [f"figure {f}" for f in figures if f not in FIGURES]
            if bad:
                wrong.append(f"{path.relative_to(SRC)}: {m.group(0)!r} -> {bad}")
    assert not wrong, "\n".join(wrong)


def test_the_xfrm_module_cites_what_it_serves() -> None:
    from btns_vici import xfrm

    sections, figures = cited(xfrm.__doc__ or "")
    assert sections == {"2.3.2", "2.3.3"} and figures == {8, 9}


def test_the_parser_reads_the_forms_the_docstrings_use() -> None:
    assert cited("draft 2.3.3, ``ipsec_get_socket_pToken``") == ({"2.3.3"}, set())
    assert cited("draft sections 2.1.2 and 2.3.2; Figures 3 and 7") == ({"2.1.2", "2.3.2"}, {3, 7})
    assert cited("(RFC 7296 section 3.13.1): the SPD ranges (draft section 2.3.5)") == ({"2.3.5"}, set())
    assert cited("draft-ietf-btns-c-api-04 section 5") == ({"5"}, set())
