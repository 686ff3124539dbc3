/*
 * bad_input.c - every libbtns-ipsec function given bad input: NULL pointers,
 * short buffers, freed tokens, made-up handles, wrong token kinds, bad
 * descriptors and malformed msghdrs. Each must return -1 (NULL) with the
 * documented errno and never crash; valid calls afterwards must still work.
 *
 * Prints "ok - NAME" / "not ok - NAME ..." per check and a summary line;
 * exits 1 if any check failed. Run without a backend daemon (no
 * BTNS_VICI_SOCKET): nothing here needs one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <ipsec_api.h>

static int passed, failed;

static void check_(const char *name, long rc, long want_rc, int err, int want_errno)
{
    if (rc == want_rc && (want_errno == 0 || err == want_errno)) {
        passed++;
        printf("ok - %s\n", name);
    } else {
        failed++;
        printf("not ok - %s: rc=%ld errno=%d (%s), want rc=%ld errno=%d (%s)\n", name, rc, err, strerror(err),
               want_rc, want_errno, strerror(want_errno));
    }
}

/* rc of a call, and errno right after it */
#define CHECK(name, call, want_rc, want_errno)                         \
    do {                                                               \
        long rc_;                                                      \
        errno = 0;                                                     \
        rc_ = (long)(call);                                            \
        check_(name, rc_, want_rc, errno, want_errno);                 \
    } while (0)

#define CHECK_NULL(name, call, want_errno)                             \
    do {                                                               \
        const void *p_;                                                \
        errno = 0;                                                     \
        p_ = (const void *)(call);                                     \
        check_(name, p_ == NULL ? -1 : 0, -1, errno, want_errno);      \
    } while (0)

#define TRUE(name, cond) check_(name, (cond) ? 1 : 0, 1, 0, 0)

static int set_u16(const void *t, uint32_t attr, uint16_t v)
{
    return ipsec_set_token_attr(t, attr, sizeof v, &v);
}

static void *churn(void *arg)
{
    int i, bad = 0;
    (void)arg;
    for (i = 0; i < 200; i++) {
        ipsec_pToken_t p = ipsec_create_pToken();
        uint16_t v = IPSEC_API_ATTR_LEVEL_HIGH, out = 0;
        uint32_t len = sizeof out;
        if (p == NULL || set_u16(p, IPSEC_API_ATTR_privacyProtected, v) != 0 ||
            ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, &len, &out) != 0 || out != v ||
            ipsec_free_pToken(p) != 0)
            bad++;
    }
    return (void *)(long)bad;
}

int main(void)
{
    ipsec_pToken_t p, q, dup = NULL, freed;
    ipsec_iToken_t it, freed_it;
    unsigned char buf[256];
    uint32_t len;
    uint16_t v16 = 0;
    int stack_var = 0;
    void *heap = malloc(64);
    const void *bogus[4];
    char names[4][64];
    size_t i;

    p = ipsec_create_pToken();
    q = ipsec_create_pToken();
    it = ipsec_create_iToken();
    TRUE("create tokens", p != NULL && q != NULL && it != NULL);

    /* ---- NULL pointers: EINVAL ---- */
    CHECK("free_iToken(NULL)", ipsec_free_iToken(NULL), -1, EINVAL);
    CHECK("free_pToken(NULL)", ipsec_free_pToken(NULL), -1, EINVAL);
    len = sizeof buf;
    CHECK("get_token_attr(NULL token)", ipsec_get_token_attr(NULL, IPSEC_API_ATTR_privacyProtected, &len, buf), -1,
          EINVAL);
    CHECK("get_token_attr(NULL attr_len)", ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, NULL, buf), -1,
          EINVAL);
    len = 4;
    CHECK("get_token_attr(NULL attr_val, len 4)", ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, &len, NULL),
          -1, EINVAL);
    CHECK("set_token_attr(NULL token)", ipsec_set_token_attr(NULL, IPSEC_API_ATTR_privacyProtected, 2, &v16), -1,
          EINVAL);
    CHECK("set_token_attr(NULL attr_val)", ipsec_set_token_attr(p, IPSEC_API_ATTR_privacyProtected, 2, NULL), -1,
          EINVAL);
    CHECK("set_token_attr(attr_len 4G, short buffer)",
          ipsec_set_token_attr(p, IPSEC_API_ATTR_policyName, 0xFFFFFFFFu, "x"), -1, EINVAL);
    CHECK("set_socket_pToken(NULL)", ipsec_set_socket_pToken(0, NULL), -1, EINVAL);
    CHECK("get_socket_pToken(NULL)", ipsec_get_socket_pToken(0, NULL), -1, EINVAL);
    CHECK("set_msg_pToken(NULL msg)", ipsec_set_msg_pToken(NULL, p), -1, EINVAL);
    CHECK("get_msg_pToken(NULL msg)", ipsec_get_msg_pToken(NULL, p), -1, EINVAL);
    CHECK("cmp_pToken(NULL, p)", ipsec_cmp_pToken(NULL, p), -1, EINVAL);
    CHECK("cmp_pToken(p, NULL)", ipsec_cmp_pToken(p, NULL), -1, EINVAL);
    CHECK("dup_pToken(NULL, &d)", ipsec_dup_pToken(NULL, &dup), -1, EINVAL);
    CHECK("dup_pToken(p, NULL)", ipsec_dup_pToken(p, NULL), -1, EINVAL);
    CHECK_NULL("import_iToken(NULL)", ipsec_import_iToken(NULL, 10), EINVAL);
    len = 0;
    CHECK("export_iToken(NULL)", ipsec_export_iToken(NULL, &len, NULL), -1, EINVAL);
    CHECK("export_iToken(NULL len)", ipsec_export_iToken(it, NULL, buf), -1, EINVAL);
    CHECK("ipsec_sendmsg(NULL msg)", ipsec_sendmsg(0, NULL, 0), -1, EINVAL);
    CHECK("ipsec_recvmsg(NULL msg)", ipsec_recvmsg(0, NULL, 0), -1, EINVAL);

    /* ---- short buffers: ERANGE and the size needed ---- */
    len = 1;
    CHECK("get uint16 into 1 byte", ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, &len, buf), -1, ERANGE);
    TRUE("  ... attr_len = 2", len == 2);
    CHECK("set policyName", ipsec_set_token_attr(p, IPSEC_API_ATTR_policyName, 6, "hello"), 0, 0);
    len = 3;
    memset(buf, 0x55, sizeof buf);
    CHECK("get policyName into 3 bytes", ipsec_get_token_attr(p, IPSEC_API_ATTR_policyName, &len, buf), -1, ERANGE);
    TRUE("  ... attr_len = 6, buffer untouched", len == 6 && buf[0] == 0x55);
    len = 0;
    CHECK("size query (NULL, 0)", ipsec_get_token_attr(p, IPSEC_API_ATTR_policyName, &len, NULL), -1, ERANGE);
    TRUE("  ... attr_len = 6", len == 6);
    len = sizeof buf;
    CHECK("get policyName", ipsec_get_token_attr(p, IPSEC_API_ATTR_policyName, &len, buf), 0, 0);
    TRUE("  ... value and length", len == 6 && memcmp(buf, "hello", 6) == 0);
    len = 1;
    CHECK("export_iToken into 1 byte", ipsec_export_iToken(it, &len, buf), -1, ERANGE);
    TRUE("  ... size needed > 1", len > 1);

    /* ---- wrong attribute, length, value ---- */
    len = sizeof buf;
    CHECK("unknown attribute 9999", ipsec_get_token_attr(p, 9999, &len, buf), -1, EINVAL);
    CHECK("iToken attribute on a pToken", ipsec_get_token_attr(p, IPSEC_API_ATTR_certificateDN, &len, buf), -1,
          EINVAL);
    CHECK("pToken attribute on an iToken", ipsec_get_token_attr(it, IPSEC_API_ATTR_privacyProtected, &len, buf), -1,
          EINVAL);
    CHECK("uint16 with attr_len 4", ipsec_set_token_attr(p, IPSEC_API_ATTR_privacyProtected, 4, "\1\0\0\0"), -1,
          EINVAL);
    CHECK("uint16 with attr_len 0", ipsec_set_token_attr(p, IPSEC_API_ATTR_privacyProtected, 0, buf), -1, EINVAL);
    CHECK("level 7 out of range", set_u16(p, IPSEC_API_ATTR_privacyProtected, 7), -1, EINVAL);
    CHECK("switch LEVEL_HIGH on tunnelMode", set_u16(p, IPSEC_API_ATTR_tunnelMode, IPSEC_API_ATTR_LEVEL_HIGH), -1,
          EINVAL);
    CHECK("string without NUL", ipsec_set_token_attr(p, IPSEC_API_ATTR_policyName, 3, "abc"), -1, EINVAL);
    CHECK("string with embedded NUL", ipsec_set_token_attr(p, IPSEC_API_ATTR_policyName, 4, "a\0b"), -1, EINVAL);
    CHECK("invalid UTF-8", ipsec_set_token_attr(p, IPSEC_API_ATTR_policyName, 3, "\xff\xfe"), -1, EINVAL);
    CHECK("malformed serialized iToken", ipsec_set_token_attr(p, IPSEC_API_ATTR_iToken, 5, "BTiT\x09"), -1, EINVAL);
    CHECK("informationString is read-only", ipsec_set_token_attr(p, IPSEC_API_ATTR_informationString, 2, "x"), -1,
          EPERM);
    CHECK("certificateDN is read-only", ipsec_set_token_attr(it, IPSEC_API_ATTR_certificateDN, 2, "x"), -1, EPERM);
    len = sizeof buf;
    CHECK("fresh pToken has no iToken", ipsec_get_token_attr(q, IPSEC_API_ATTR_iToken, &len, buf), -1, ENODATA);
    CHECK_NULL("import garbage", ipsec_import_iToken("garbage!", 8), EINVAL);
    CHECK_NULL("import 4G length", ipsec_import_iToken("BTiT", 0xFFFFFFFFu), EINVAL);
    CHECK_NULL("import empty", ipsec_import_iToken("", 0), EINVAL);

    /* ---- freed tokens: EBADF ---- */
    freed = ipsec_create_pToken();
    freed_it = ipsec_create_iToken();
    CHECK("free pToken", ipsec_free_pToken(freed), 0, 0);
    CHECK("free iToken", ipsec_free_iToken(freed_it), 0, 0);
    CHECK("free pToken twice", ipsec_free_pToken(freed), -1, EBADF);
    CHECK("free iToken twice", ipsec_free_iToken(freed_it), -1, EBADF);
    len = sizeof buf;
    CHECK("get on freed pToken", ipsec_get_token_attr(freed, IPSEC_API_ATTR_privacyProtected, &len, buf), -1, EBADF);
    CHECK("set on freed pToken", set_u16(freed, IPSEC_API_ATTR_privacyProtected, 1), -1, EBADF);
    CHECK("get on freed iToken", ipsec_get_token_attr(freed_it, IPSEC_API_ATTR_authMeth_BTNS, &len, buf), -1, EBADF);
    CHECK("dup of freed pToken", ipsec_dup_pToken(freed, &dup), -1, EBADF);
    TRUE("  ... *p_dup = NULL", dup == NULL);
    CHECK("cmp with freed pToken", ipsec_cmp_pToken(p, freed), -1, EBADF);
    CHECK("set_socket_pToken with freed pToken", ipsec_set_socket_pToken(0, freed), -1, EBADF);
    CHECK("export freed iToken", ipsec_export_iToken(freed_it, &len, buf), -1, EBADF);

    /* ---- handles that were never tokens: EBADF, never dereferenced ---- */
    bogus[0] = (const void *)1;
    bogus[1] = (const void *)(uintptr_t)0xdeadbeef;
    bogus[2] = &stack_var;
    bogus[3] = heap;
    for (i = 0; i < 4; i++) {
        snprintf(names[i], sizeof names[i], "get on bogus handle %zu", i);
        len = sizeof buf;
        CHECK(names[i], ipsec_get_token_attr(bogus[i], IPSEC_API_ATTR_privacyProtected, &len, buf), -1, EBADF);
        snprintf(names[i], sizeof names[i], "free bogus handle %zu", i);
        CHECK(names[i], ipsec_free_pToken((ipsec_pToken_t)(uintptr_t)bogus[i]), -1, EBADF);
    }
    CHECK("set on handle + 1", set_u16((const char *)p + 1, IPSEC_API_ATTR_privacyProtected, 1), -1, EBADF);

    /* ---- wrong token kind: EINVAL ---- */
    CHECK("free_iToken(pToken)", ipsec_free_iToken((ipsec_iToken_t)(void *)p), -1, EINVAL);
    CHECK("free_pToken(iToken)", ipsec_free_pToken((ipsec_pToken_t)(void *)it), -1, EINVAL);
    CHECK("dup_pToken(iToken)", ipsec_dup_pToken((ipsec_pToken_t)(void *)it, &dup), -1, EINVAL);
    len = sizeof buf;
    CHECK("export_iToken(pToken)", ipsec_export_iToken((ipsec_iToken_t)(void *)p, &len, buf), -1, EINVAL);

    /* ---- descriptors ---- */
    {
        int devnull = open("/dev/null", O_RDONLY);
        int closed = socket(AF_INET, SOCK_STREAM, 0);
        int unix_pair[2] = {-1, -1};
        int unix_fd = socketpair(AF_UNIX, SOCK_STREAM, 0, unix_pair) == 0 ? unix_pair[0] : -1;
        int tcp = socket(AF_INET, SOCK_STREAM, 0);
        close(closed);
        CHECK("set_socket_pToken(-1)", ipsec_set_socket_pToken(-1, p), -1, EBADF);
        CHECK("get_socket_pToken(-1)", ipsec_get_socket_pToken(-1, p), -1, EBADF);
        CHECK("set_socket_pToken(closed fd)", ipsec_set_socket_pToken(closed, p), -1, EBADF);
        CHECK("get_socket_pToken(/dev/null)", ipsec_get_socket_pToken(devnull, p), -1, ENOTSOCK);
        CHECK("get_socket_pToken(connected AF_UNIX)", ipsec_get_socket_pToken(unix_fd, p), -1, EAFNOSUPPORT);
        CHECK("get_socket_pToken(unconnected, none attached)", ipsec_get_socket_pToken(tcp, p), -1, ENOTCONN);
        CHECK("set_socket_pToken(iToken)", ipsec_set_socket_pToken(tcp, (ipsec_pToken_t)(void *)it), -1, EINVAL);
        close(devnull);
        close(unix_pair[0]);
        close(unix_pair[1]);
        close(tcp);
    }

    /* ---- msghdr ---- */
    {
        struct msghdr msg;
        union {
            struct cmsghdr align;
            unsigned char bytes[256];
        } ctl;
        struct sockaddr_in src;
        struct sockaddr_un sun;
        struct cmsghdr *c;
        uint64_t h;
        size_t used;

        memset(&msg, 0, sizeof msg);
        CHECK("set_msg_pToken, no control buffer", ipsec_set_msg_pToken(&msg, p), -1, ENOBUFS);
        msg.msg_controllen = 16;
        CHECK("set_msg_pToken, NULL control with length", ipsec_set_msg_pToken(&msg, p), -1, EINVAL);
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.bytes;
        msg.msg_controllen = 8;
        CHECK("set_msg_pToken, 8-byte control buffer", ipsec_set_msg_pToken(&msg, p), -1, ENOBUFS);
        msg.msg_controllen = sizeof ctl.bytes;
        CHECK("set_msg_pToken, freed pToken", ipsec_set_msg_pToken(&msg, freed), -1, EBADF);
        CHECK("set_msg_pToken, iToken", ipsec_set_msg_pToken(&msg, (ipsec_pToken_t)(void *)it), -1, EINVAL);
        CHECK("set_msg_pToken", ipsec_set_msg_pToken(&msg, p), 0, 0);
        c = CMSG_FIRSTHDR(&msg);
        memcpy(&h, CMSG_DATA(c), sizeof h);
        TRUE("  ... one IPSEC_CMSG_PTOKEN cmsg with the handle",
             msg.msg_controllen == IPSEC_MSG_PTOKEN_SPACE && c->cmsg_level == IPSEC_CMSG_PTOKEN_LEVEL &&
                 c->cmsg_type == IPSEC_CMSG_PTOKEN && c->cmsg_len == CMSG_LEN(sizeof h) && h == (uint64_t)(uintptr_t)p);
        msg.msg_controllen = sizeof ctl.bytes;
        CHECK("set_msg_pToken again (replaces)", ipsec_set_msg_pToken(&msg, q), 0, 0);
        memcpy(&h, CMSG_DATA(c), sizeof h);
        TRUE("  ... still one cmsg, new handle", msg.msg_controllen == IPSEC_MSG_PTOKEN_SPACE &&
                                                    h == (uint64_t)(uintptr_t)q);
        used = msg.msg_controllen;
        msg.msg_controllen = used; /* full: no room for a second, but replacing needs none */
        CHECK("set_msg_pToken on a full buffer holding one", ipsec_set_msg_pToken(&msg, p), 0, 0);
        memset(&ctl, 0, sizeof ctl);
        c = (struct cmsghdr *)ctl.bytes;
        c->cmsg_len = 3; /* shorter than a header */
        msg.msg_controllen = sizeof ctl.bytes;
        CHECK("set_msg_pToken, malformed cmsg", ipsec_set_msg_pToken(&msg, p), -1, EINVAL);
        c->cmsg_len = 100000; /* beyond the buffer */
        CHECK("set_msg_pToken, cmsg_len past the end", ipsec_set_msg_pToken(&msg, p), -1, EINVAL);

        memset(&msg, 0, sizeof msg);
        CHECK("get_msg_pToken, no msg_name", ipsec_get_msg_pToken(&msg, p), -1, EINVAL);
        memset(&sun, 0, sizeof sun);
        sun.sun_family = AF_UNIX;
        msg.msg_name = &sun;
        msg.msg_namelen = sizeof sun;
        CHECK("get_msg_pToken, AF_UNIX source", ipsec_get_msg_pToken(&msg, p), -1, EINVAL);
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_port = htons(5000);
        src.sin_addr.s_addr = htonl(0x7f000001);
        msg.msg_name = &src;
        msg.msg_namelen = 4; /* truncated sockaddr */
        CHECK("get_msg_pToken, truncated msg_name", ipsec_get_msg_pToken(&msg, p), -1, EINVAL);
        msg.msg_namelen = sizeof src;
        CHECK("get_msg_pToken, no IP_PKTINFO", ipsec_get_msg_pToken(&msg, p), -1, EINVAL);
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(struct in_pktinfo));
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        CHECK("get_msg_pToken, freed pToken", ipsec_get_msg_pToken(&msg, freed), -1, EBADF);
        c->cmsg_len = 100000;
        CHECK("get_msg_pToken, cmsg_len past the end", ipsec_get_msg_pToken(&msg, p), -1, EINVAL);

        /* ipsec_sendmsg with a freed pToken attached refuses before sending */
        {
            int u = socket(AF_INET, SOCK_DGRAM, 0);
            struct iovec iov;
            memset(&msg, 0, sizeof msg);
            memset(&ctl, 0, sizeof ctl);
            iov.iov_base = "x";
            iov.iov_len = 1;
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_name = &src;
            msg.msg_namelen = sizeof src;
            msg.msg_control = ctl.bytes;
            msg.msg_controllen = sizeof ctl.bytes;
            ipsec_pToken_t gone = ipsec_create_pToken();
            CHECK("set_msg_pToken (to be freed)", ipsec_set_msg_pToken(&msg, gone), 0, 0);
            ipsec_free_pToken(gone);
            CHECK("ipsec_sendmsg, attached pToken freed", ipsec_sendmsg(u, &msg, 0), -1, EBADF);
            close(u);
        }
    }

    /* ---- valid calls still work ---- */
    CHECK("dup_pToken", ipsec_dup_pToken(p, &dup), 0, 0);
    CHECK("cmp_pToken(p, dup) == 0", ipsec_cmp_pToken(p, dup), 0, 0);
    CHECK("set privacy on dup", set_u16(dup, IPSEC_API_ATTR_privacyProtected, IPSEC_API_ATTR_LEVEL_HIGH), 0, 0);
    CHECK("cmp_pToken(p, dup) == 1 after change", ipsec_cmp_pToken(p, dup), 1, 0);
    CHECK("free dup", ipsec_free_pToken(dup), 0, 0);
    CHECK("LEAPOFFFAITH == LEAPOFFAITH", IPSEC_API_ATTR_authMeth_LEAPOFFFAITH, IPSEC_API_ATTR_authMeth_LEAPOFFAITH,
          0);
    CHECK("set authMeth_LEAPOFFFAITH", set_u16(it, IPSEC_API_ATTR_authMeth_LEAPOFFFAITH, IPSEC_API_ATTR_ENABLE), 0, 0);
    len = sizeof v16;
    CHECK("get authMeth_LEAPOFFAITH", ipsec_get_token_attr(it, IPSEC_API_ATTR_authMeth_LEAPOFFAITH, &len, &v16), 0,
          0);
    TRUE("  ... ENABLE", v16 == IPSEC_API_ATTR_ENABLE && len == 2);

    /* ---- threads: concurrent create/set/get/free ---- */
    {
        pthread_t th[4];
        void *res;
        long bad = 0;
        for (i = 0; i < 4; i++)
            pthread_create(&th[i], NULL, churn, NULL);
        for (i = 0; i < 4; i++) {
            pthread_join(th[i], &res);
            bad += (long)res;
        }
        TRUE("4 threads x 200 tokens", bad == 0);
    }

    CHECK("free p", ipsec_free_pToken(p), 0, 0);
    CHECK("free q", ipsec_free_pToken(q), 0, 0);
    CHECK("free it", ipsec_free_iToken(it), 0, 0);
    free(heap);
    printf("bad_input: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
