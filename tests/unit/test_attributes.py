"""The attribute table is the one source: the C header, capi, the tokens and the README agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import btns_vici
from btns_vici import capi
from btns_vici.core import attributes as at
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.tokens import IToken, PToken

ROOT = Path(__file__).resolve().parents[2]
HEADER = Path(btns_vici.__file__).parent / "cabi" / "ipsec_api.h"
README = ROOT / "README.md"


def header_enums() -> dict[str, dict[str, int]]:
    """Every enum of ipsec_api.h: its name -> {constant: value}."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    enums: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"\benum\s+(\w+)\s*\{(.*?)\}", text, flags=re.S):
        members = {}
        for item in body.split(","):
            if item.strip():
                key, _, value = item.partition("=")
                members[key.strip()] = int(value.strip(), 0)
        assert name not in enums, f"enum {name} declared twice"
        enums[name] = members
    return enums


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"### {title}\n")
    end = text.index("\n#", start + 1)
    return text[start:end]


def readme_rows(section: str, first_header: str) -> list[list[str]]:
    """The cells of the Markdown table in ``section`` whose first header cell is ``first_header``."""
    lines = section.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _code(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def expected_readme_row(spec: at.AttrSpec) -> tuple[str, str, str, str, str]:
    """What README says of one attribute: token, type, writable, initial, compared."""
    token = {at.Kind.ITOKEN: "iToken", at.Kind.PTOKEN: "pToken", at.Kind.BOTH: "both"}[spec.kinds]
    if spec.kinds == at.Kind.BOTH and spec.settable not in (at.Kind.NONE, at.Kind.BOTH):
        writable = "; ".join(
            f"{name}: {'yes' if kind in spec.settable else 'no'}"
            for name, kind in (("pToken", at.Kind.PTOKEN), ("iToken", at.Kind.ITOKEN))
        )
    else:
        writable = "yes" if spec.settable == spec.kinds else "no"
    initial = "—" if spec.default is None else f"`{spec.default.name}`"
    return token, spec.codec.name, writable, initial, "yes" if spec.compared else "no"


def test_the_table_has_one_row_per_attribute_in_order() -> None:
    assert [row.attr for row in at.TABLE] == sorted(Attr)
    assert set(at.SPEC) == set(Attr)
    for row in at.TABLE:
        assert row.kinds != at.Kind.NONE
        assert row.settable in (at.Kind.NONE, *[k for k in at.Kind if k in row.kinds])
        assert (row.codec.values is None) == (row.codec.c_struct is None) == (row.codec.wire_struct is None)
        if row.default is not None:
            assert row.codec.values is not None and row.default in row.codec.values


def test_header_enums_are_the_table_and_capi() -> None:
    enums = header_enums()
    assert set(enums) == {at.ENUM_ITOKEN, at.ENUM_AUTH_METH, at.ENUM_PTOKEN, at.ENUM_VALUES}
    flat = {name: value for members in enums.values() for name, value in members.items()}
    assert sum(len(m) for m in enums.values()) == len(flat), "a name in two enums"
    assert flat == capi.CONSTANTS
    for row in at.TABLE:
        assert enums[row.enum][f"IPSEC_API_ATTR_{row.attr.name}"] == row.attr
    assert enums[at.ENUM_AUTH_METH]["IPSEC_API_ATTR_authMeth_LEAPOFFFAITH"] == Attr.authMeth_LEAPOFFAITH
    assert enums[at.ENUM_VALUES] == {f"IPSEC_API_ATTR_{s.name}": int(s) for s in Setting}


def test_capi_constants_are_module_attributes_and_exported() -> None:
    assert capi.CONSTANTS == at.capi_constants()
    for name, value in capi.CONSTANTS.items():
        assert getattr(capi, name) == value and type(getattr(capi, name)) is int
        assert name in capi.__all__
    with pytest.raises(AttributeError):
        _ = capi.IPSEC_API_ATTR_nonexistent


def test_readme_constant_values_table_is_the_table() -> None:
    section = readme_section("Constant values")
    seen: list[Attr] = []
    for cells in readme_rows(section, "attribute"):
        names, values, *rest = cells
        if "…" in names:  # a run of consecutive attributes sharing every column
            first, last = (_code(n.strip()) for n in names.split("…"))
            lo, hi = (int(v.split()[0]) for v in values.split("…"))
            run = [a for a in Attr if Attr[first] <= a <= Attr[last]]
            assert [int(run[0]), int(run[-1])] == [lo, hi] == [Attr[first], Attr[last]]
        else:
            run = [Attr[_code(names)]]
            assert int(values) == run[0]
        for attr in run:
            assert tuple(rest) == expected_readme_row(at.SPEC[attr]), attr.name
        seen += run
    assert seen == list(Attr)
    values = {_code(c[0]): int(c[1]) for c in readme_rows(section, "value")}
    assert values == {f"IPSEC_API_ATTR_{s.name}": int(s) for s in Setting}
    assert "`IPSEC_API_ATTR_authMeth_LEAPOFFFAITH`" in section


def test_header_comments_agree_with_the_table() -> None:
    """Where the header comments on an attribute, it names the table's type and access."""
    word = {"uint16": "uint16_t", "string": "string", "binary": "binary", "itoken": "serialized iToken"}
    lines = HEADER.read_text().splitlines()
    commented = 0
    for spec in at.TABLE:
        line = next(x for x in lines if re.search(rf"\bIPSEC_API_ATTR_{spec.attr.name} =", x))
        comment = line.partition("/*")[2]
        if comment:
            commented += 1
            assert word[spec.codec.form] in comment, spec.attr.name
            assert ("read-only" in comment) == (spec.settable == at.Kind.NONE and spec.kinds == at.Kind.PTOKEN)
    assert commented == len([r for r in at.TABLE if r.enum != at.ENUM_AUTH_METH])
    line = next(x for x in lines if "IPSEC_API_ATTR_auditString =" in x)
    assert "pToken: writable" in line and at.SPEC[Attr.auditString].settable == at.Kind.PTOKEN


def test_tokens_follow_the_table() -> None:
    for cls, rules in ((IToken, at.ITOKEN_RULES), (PToken, at.PTOKEN_RULES)):
        fresh = cls()
        assert fresh.attributes() == dict(rules.defaults)
        for attr in Attr:
            if attr not in rules.allowed:
                with pytest.raises(OSError):
                    fresh.get_attr(attr)
    assert at.AUTH_SWITCHES == tuple(Attr(m) for m in AuthMethod)
    assert at.ITOKEN_RULES.compared == (*at.IDENTITY_ATTRS, *at.AUTH_SWITCHES)
    assert set(at.PTOKEN_RULES.compared) == {*at.LEVEL_ATTRS, *at.SWITCH_ATTRS, *at.OBJECT_ATTRS}


@pytest.mark.parametrize("spec", at.TABLE, ids=lambda s: s.attr.name)
def test_c_and_wire_forms_follow_the_codec(spec: at.AttrSpec) -> None:
    sample: object = {
        "uint16": min(spec.codec.values or {0}),
        "string": "x",
        "binary": b"\x01\x02",
        "itoken": None,
    }[spec.codec.form]
    if sample is None:
        with pytest.raises(OSError):
            at.check_scalar(spec, "x")
        return
    value = at.check_scalar(spec, sample)
    c_form, wire = at.to_c(spec, value), at.to_wire(spec, value)
    assert at.from_c(spec, c_form) == value
    if spec.codec.c_struct is not None and spec.codec.wire_struct is not None:
        assert c_form == spec.codec.c_struct.pack(value) and wire == spec.codec.wire_struct.pack(value)
    elif spec.codec.form == "string":
        assert (c_form, wire) == (b"x\0", b"x")
    else:
        assert c_form == wire == b"\x01\x02"
