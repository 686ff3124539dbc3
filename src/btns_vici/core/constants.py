"""The draft's constants (figures 4 and 8), with every value made distinct.

draft-ietf-btns-c-api-04 declares three anonymous enums that all start at 0 and
names ``IPSEC_API_ATTR_auditString`` in two of them, so in C an ``attr_type``
would be ambiguous (and the header would not even compile). It also uses
``IPSEC_API_ATTR_ENABLE``/``_DISABLE``/``_ANY``/``_LEVEL_*`` without giving
values. The choices below are documented in README.md ("Constant values"); every
rule about an attribute (token kind, type, access, default) is in :mod:`.attributes`.
"""

from __future__ import annotations

from enum import IntEnum


class Attr(IntEnum):
    """Every attribute type, iToken (figure 4) and pToken (figure 8), one value each."""

    # Shared by both token kinds: the draft lists it in both enums.
    auditString = 1
    # iToken_attribute (figure 4): identity attributes, read-only.
    authenticationMethod = 2
    certificateAuthorityDN = 3
    certificateDN = 4
    pubKeyID = 5
    channelBinding = 6
    # iToken_auth_meth (figure 4): authentication-method switches, read/write.
    authMeth_NONE = 16
    authMeth_BTNS = 17
    authMeth_LEAPOFFAITH = 18
    authMeth_PRESHAREDKEY = 19
    authMeth_GROUPKEY = 20
    authMeth_XAUTH = 21
    authMeth_EAP = 22
    authMeth_PKIX_TRUSTED = 23
    authMeth_PKIX_INLINE = 24
    authMeth_PKIX_OFFLINE = 25
    # pToken_attribute (figure 8).
    privacyProtected = 32
    integrityProtected = 33
    compressionAvailable = 34
    policyName = 35
    iToken = 36
    remote_iToken = 37
    tunnelMode = 38
    ipoptionsProtected = 39
    informationString = 40


class AuthMethod(IntEnum):
    """Authentication methods (draft section 2.1.2, Figure 4's ``iToken_auth_meth``); a value is also
    the attribute id of its switch.

    ``authenticationMethod`` holds one of these values as a 2-octet integer.
    """

    NONE = Attr.authMeth_NONE
    BTNS = Attr.authMeth_BTNS
    LEAPOFFAITH = Attr.authMeth_LEAPOFFAITH
    PRESHAREDKEY = Attr.authMeth_PRESHAREDKEY
    GROUPKEY = Attr.authMeth_GROUPKEY
    XAUTH = Attr.authMeth_XAUTH
    EAP = Attr.authMeth_EAP
    PKIX_TRUSTED = Attr.authMeth_PKIX_TRUSTED
    PKIX_INLINE = Attr.authMeth_PKIX_INLINE
    PKIX_OFFLINE = Attr.authMeth_PKIX_OFFLINE


class Setting(IntEnum):
    """Values of the 2-octet switch and level attributes: ``IPSEC_API_ATTR_ENABLE``/``DISABLE``/``ANY``
    (draft section 2.1.2) and ``LEVEL_LOW``/``MEDIUM``/``HIGH`` (section 2.3.2).

    Ordered so that a larger level is stronger: LEVEL_LOW < LEVEL_MEDIUM < LEVEL_HIGH.
    """

    DISABLE = 0
    ENABLE = 1
    ANY = 2
    LEVEL_LOW = 3
    LEVEL_MEDIUM = 4
    LEVEL_HIGH = 5


#: Alias: the levels are values of :class:`Setting`.
Level = Setting
