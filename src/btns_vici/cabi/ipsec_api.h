/*
 * ipsec_api.h - C bindings for IPsec APIs (draft-ietf-btns-c-api-04), btns-vici.
 *
 * Library: libbtns-ipsec.so (pkg-config name: btns-ipsec). The tokens live in
 * the btns-vici Python core embedded in the library; a token pointer is an
 * opaque handle, never dereferenced: a freed or made-up handle gives -1 with
 * errno EBADF, a NULL pointer -1 with errno EINVAL (see "C ABI" in README.md).
 *
 * Constant values are the ones of btns_vici.capi (README "Constant values"):
 * the draft's enums all start at 0 and name auditString twice, which would not
 * compile; here every attribute has a distinct, non-zero value.
 *
 * Everything marked EXTENSION is not in the draft.
 */
#ifndef BTNS_IPSEC_API_H
#define BTNS_IPSEC_API_H

#include <stdint.h>
#include <sys/types.h> /* ssize_t */

#ifdef __cplusplus
extern "C" {
#endif

struct msghdr;

/* Figure 2 and figure 6: opaque token types. */
typedef struct ipsec_iToken *ipsec_iToken_t;
typedef struct ipsec_pToken *ipsec_pToken_t;

/* Figure 4: iToken attributes (identity, read-only). auditString is valid on
 * both token kinds (figure 8 lists it too). */
enum ipsec_iToken_attribute {
    IPSEC_API_ATTR_auditString = 1,            /* string; pToken: writable */
    IPSEC_API_ATTR_authenticationMethod = 2,   /* uint16_t: an authMeth_* value */
    IPSEC_API_ATTR_certificateAuthorityDN = 3, /* string */
    IPSEC_API_ATTR_certificateDN = 4,          /* string */
    IPSEC_API_ATTR_pubKeyID = 5,               /* binary: DER SubjectPublicKeyInfo */
    IPSEC_API_ATTR_channelBinding = 6          /* string, compare with memcmp() */
};

/* Figure 4: authentication-method switches (uint16_t DISABLE/ENABLE/ANY, writable). */
enum ipsec_iToken_auth_meth {
    IPSEC_API_ATTR_authMeth_NONE = 16,
    IPSEC_API_ATTR_authMeth_BTNS = 17,
    IPSEC_API_ATTR_authMeth_LEAPOFFAITH = 18,
    IPSEC_API_ATTR_authMeth_LEAPOFFFAITH = 18, /* as printed in figure 4; same value */
    IPSEC_API_ATTR_authMeth_PRESHAREDKEY = 19,
    IPSEC_API_ATTR_authMeth_GROUPKEY = 20,
    IPSEC_API_ATTR_authMeth_XAUTH = 21,
    IPSEC_API_ATTR_authMeth_EAP = 22,
    IPSEC_API_ATTR_authMeth_PKIX_TRUSTED = 23,
    IPSEC_API_ATTR_authMeth_PKIX_INLINE = 24,
    IPSEC_API_ATTR_authMeth_PKIX_OFFLINE = 25
};

/* Figure 8: pToken attributes (IPSEC_API_ATTR_auditString = 1 above is one too). */
enum ipsec_pToken_attribute {
    IPSEC_API_ATTR_privacyProtected = 32,     /* uint16_t level */
    IPSEC_API_ATTR_integrityProtected = 33,   /* uint16_t level */
    IPSEC_API_ATTR_compressionAvailable = 34, /* uint16_t switch */
    IPSEC_API_ATTR_policyName = 35,           /* string */
    IPSEC_API_ATTR_iToken = 36,               /* serialized iToken (ipsec_import_iToken) */
    IPSEC_API_ATTR_remote_iToken = 37,        /* serialized iToken */
    IPSEC_API_ATTR_tunnelMode = 38,           /* uint16_t switch */
    IPSEC_API_ATTR_ipoptionsProtected = 39,   /* uint16_t switch */
    IPSEC_API_ATTR_informationString = 40     /* string, read-only */
};

/* Values of the uint16_t switch and level attributes (used but not defined by the draft). */
enum ipsec_api_attr_value {
    IPSEC_API_ATTR_DISABLE = 0,
    IPSEC_API_ATTR_ENABLE = 1,
    IPSEC_API_ATTR_ANY = 2,
    IPSEC_API_ATTR_LEVEL_LOW = 3,
    IPSEC_API_ATTR_LEVEL_MEDIUM = 4,
    IPSEC_API_ATTR_LEVEL_HIGH = 5
};

/* Figure 3: iToken constructor (NULL + errno on failure) and destructor (0 / -1 + errno). */
ipsec_iToken_t ipsec_create_iToken(void);
int ipsec_free_iToken(ipsec_iToken_t p);

/* Figure 5: attribute access on either token kind; 0, or -1 and errno.
 * get: *attr_len is the size of attr_val on input and the length of the value
 * on output; if the value does not fit: -1, errno ERANGE, *attr_len = the size
 * needed (so *attr_len = 0 with attr_val NULL asks for the size). */
int ipsec_get_token_attr(const void *token,
                         uint32_t attr_type,
                         uint32_t *attr_len,
                         void *attr_val);
int ipsec_set_token_attr(const void *token,
                         uint32_t attr_type,
                         uint32_t attr_len,
                         const void *attr_val);

/* Figure 7: pToken constructor and destructor. */
ipsec_pToken_t ipsec_create_pToken(void);
int ipsec_free_pToken(ipsec_pToken_t p);

/* Figure 9: connection-oriented sockets; 0, or -1 and errno. */
int ipsec_set_socket_pToken(int fd, const ipsec_pToken_t pToken);
int ipsec_get_socket_pToken(int fd, ipsec_pToken_t pToken);

/* Figure 10: datagrams; 0, or -1 and errno.
 * set: msg->msg_controllen is the capacity of msg->msg_control; the control
 * messages already there end at the first cmsghdr with cmsg_len 0 (zero the
 * buffer first) or at the end of the buffer. A control message (level
 * IPSEC_CMSG_PTOKEN_LEVEL (SOL_SOCKET), type IPSEC_CMSG_PTOKEN, data: the pToken handle as uint64_t) is
 * appended, or an existing one replaced, and msg_controllen is set to the
 * length used. No room: -1, ENOBUFS. The pToken must stay alive until the
 * message is sent with ipsec_sendmsg().
 * get: the source is msg->msg_name, the local address and the arrival device an
 * IP_PKTINFO or IPV6_PKTINFO control message, the local port an
 * IPSEC_CMSG_LOCALPORT control message if present (ipsec_recvmsg adds one),
 * else 0, the receiving socket's network namespace an IPSEC_CMSG_NETNS control
 * message (ipsec_recvmsg adds one), the receiving socket itself an
 * IPSEC_CMSG_RECEIVER control message (ipsec_recvmsg adds one: btnsd answers
 * only for a socket it receives, so through btnsd a datagram without it, or whose
 * socket was closed since, is unprotected with that reason). Without the arrival
 * device and namespace the datagram cannot be proven protected: the pToken says unprotected.
 * Missing or malformed: -1, EINVAL. */
int ipsec_set_msg_pToken(struct msghdr *msg, const ipsec_pToken_t pToken);
int ipsec_get_msg_pToken(const struct msghdr *msg, ipsec_pToken_t pToken);

/* Figure 11: 0 when equivalent (section 2.3.5), 1 when not, -1 and errno on error. */
int ipsec_cmp_pToken(ipsec_pToken_t p1, ipsec_pToken_t p2);

/* Figure 12: a new copy in *p_dup (free it with ipsec_free_pToken); 0, or -1 and errno. */
int ipsec_dup_pToken(const ipsec_pToken_t p, ipsec_pToken_t *p_dup);

/* ---- EXTENSIONS (not in draft-ietf-btns-c-api-04) --------------------------- */

#define BTNS_IPSEC_API_VERSION 1

/* Private control-message level ("BT") and types; the kernel never sees them. */
#define SOL_BTNS 0x4254
/* The pToken's control message has level SOL_SOCKET and a type the kernel does not know, so that a
 * plain sendmsg(2) of a message carrying it fails with EINVAL instead of silently sending without
 * the check: only ipsec_sendmsg() honours (and strips) it. */
#define IPSEC_CMSG_PTOKEN_LEVEL SOL_SOCKET
#define IPSEC_CMSG_PTOKEN 0x4254 /* data: uint64_t pToken handle */
#define IPSEC_CMSG_LOCALPORT 2 /* data: uint16_t local port, host byte order */
#define IPSEC_CMSG_NETNS 3     /* data: uint64_t st_dev, st_ino of the receiving socket's network namespace */
#define IPSEC_CMSG_RECEIVER 4  /* data: uint64_t fd, st_dev, st_ino of the receiving socket itself */
/* Control-buffer space ipsec_set_msg_pToken needs (include <sys/socket.h>). */
#define IPSEC_MSG_PTOKEN_SPACE CMSG_SPACE(sizeof(uint64_t))
#define IPSEC_MSG_LOCALPORT_SPACE CMSG_SPACE(sizeof(uint16_t))
/* Control-buffer space ipsec_recvmsg appends after the kernel's: local port, namespace, receiver. */
#define IPSEC_MSG_RECV_SPACE                                                                               \
    (CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(2 * sizeof(uint64_t)) + CMSG_SPACE(3 * sizeof(uint64_t)))

/* EXTENSION: an iToken object from serialized bytes, e.g. the value of a
 * pToken's IPSEC_API_ATTR_iToken / IPSEC_API_ATTR_remote_iToken attribute.
 * NULL and errno (EINVAL: malformed) on failure. */
ipsec_iToken_t ipsec_import_iToken(const void *buf, uint32_t len);

/* EXTENSION: serialize an iToken (for ipsec_set_token_attr(p, IPSEC_API_ATTR_iToken, ...)).
 * *len in/out as for ipsec_get_token_attr (ERANGE with the size needed). */
int ipsec_export_iToken(const ipsec_iToken_t t, uint32_t *len, void *buf);

/* EXTENSION: sendmsg(2) that honours a pToken attached with ipsec_set_msg_pToken:
 * refuses with -1/EACCES unless this socket's datagram to the destination
 * satisfies it now (with the message's own IP_PKTINFO device, SO_MARK and
 * MSG_DONTROUTE as the kernel will apply them), removes the private control
 * message, then sends. */
ssize_t ipsec_sendmsg(int fd, const struct msghdr *msg, int flags);

/* EXTENSION: recvmsg(2) that records what ipsec_get_msg_pToken needs: it turns
 * on IP_PKTINFO / IPV6_RECVPKTINFO and appends the IPSEC_CMSG_LOCALPORT,
 * IPSEC_CMSG_NETNS and IPSEC_CMSG_RECEIVER control messages when msg_control has
 * room for them (IPSEC_MSG_RECV_SPACE bytes beyond the kernel's). The
 * kernel records the arrival device only for datagrams queued after
 * IP_PKTINFO / IPV6_RECVPKTINFO was turned on: set it yourself right after
 * bind(2), or the first datagrams' pTokens say unprotected. */
ssize_t ipsec_recvmsg(int fd, struct msghdr *msg, int flags);

#ifdef __cplusplus
}
#endif

#endif /* BTNS_IPSEC_API_H */
