/*
 * libbtns_ipsec.c - the C side of libbtns-ipsec.so (draft-ietf-btns-c-api-04).
 *
 * cffi compiles this file into an embedding module (see build.py): the
 * exported ipsec_* functions check every pointer here, in C, then call the
 * btns-vici Python core through the extern "Python" functions _btns_py_*
 * (implemented in btns_vici/cabi/_runtime.py). Each of those reports its
 * outcome in *err: 0, or the errno of the Python OSError. A token pointer is
 * a handle into the core's table and is never dereferenced.
 *
 * The interpreter is started on the first call: with the Python of the
 * environment the library is installed in (<prefix>/bin/python3, so a venv's
 * site-packages and editable installs are found), else the one it was built
 * with. If the core cannot be started every call fails with ELIBACC.
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ipsec_api.h"

#ifndef SIOCGSKNS
#define SIOCGSKNS 0x894C /* linux/sockios.h: a new fd for the socket's network namespace */
#endif

#define BTNS_KIND_ITOKEN 1
#define BTNS_KIND_PTOKEN 2
/* errno of every call when the embedded Python core cannot be started. */
#define BTNS_ERR_NOCORE ELIBACC
/* No attribute value is longer (a serialized iToken is at most 32768 bytes):
 * longer attr_len values are refused before anything is read. */
#define BTNS_MAX_ATTR_LEN 65536u

/* extern "Python" functions, defined by cffi further down this file. */
static void _btns_py_create(int kind, uintptr_t *handle, int *err);
static void _btns_py_free(int kind, uintptr_t handle, int *err);
static void _btns_py_check(int kind, uintptr_t handle, int *err);
static void _btns_py_get_attr(uintptr_t handle, uint32_t attr_type, uint32_t *attr_len, void *attr_val, int *err);
static void _btns_py_set_attr(uintptr_t handle, uint32_t attr_type, uint32_t attr_len, const void *attr_val,
                              int *err);
static void _btns_py_set_socket(int fd, uintptr_t handle, int *err);
static void _btns_py_get_socket(int fd, uintptr_t handle, int *err);
static void _btns_py_cmp(uintptr_t a, uintptr_t b, int *result, int *err);
static void _btns_py_dup(uintptr_t handle, uintptr_t *out, int *err);
static void _btns_py_import(const void *buf, uint32_t len, uintptr_t *out, int *err);
static void _btns_py_export(uintptr_t handle, uint32_t *len, void *buf, int *err);
static void _btns_py_fill_flow(uintptr_t handle, int proto, int lfamily, const unsigned char *laddr, int lport,
                               int rfamily, const unsigned char *raddr, int rport, int ifindex, uint64_t ns_dev,
                               uint64_t ns_ino, int rcv_fd, uint64_t rcv_dev, uint64_t rcv_ino, int *err);
static void _btns_py_check_send(int fd, uintptr_t handle, int has_dest, int family, const unsigned char *addr,
                                int port, int oif, int has_mark, uint32_t mark, int dontroute, int *err);

/* ---- starting the embedded interpreter ------------------------------------ */

static pthread_once_t btns_once = PTHREAD_ONCE_INIT;
static int btns_core_failed = 0;
static char btns_libpath[PATH_MAX];

static const char btns_site_code[] =
    "import os, site, sys\n"
    "prefix = os.path.dirname(os.path.dirname(os.path.abspath(libpath)))\n"
    "for sub in ('site-packages', 'dist-packages'):\n"
    "    d = os.path.join(prefix, 'lib', 'python%d.%d' % sys.version_info[:2], sub)\n"
    "    if os.path.isdir(d) and d not in sys.path:\n"
    "        site.addsitedir(d)\n";

/* Add the site-packages of the library's prefix (GIL held). */
static void btns_add_site(void)
{
    PyObject *globals, *path, *res;

    if (btns_libpath[0] == '\0')
        return;
    globals = PyDict_New();
    if (globals == NULL) {
        PyErr_Clear();
        return;
    }
    path = PyUnicode_DecodeFSDefault(btns_libpath);
    if (path != NULL && PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) == 0 &&
        PyDict_SetItemString(globals, "libpath", path) == 0) {
        res = PyRun_String(btns_site_code, Py_file_input, globals, globals);
        Py_XDECREF(res);
    }
    Py_XDECREF(path);
    Py_DECREF(globals);
    if (PyErr_Occurred()) {
        if (getenv("BTNS_IPSEC_DEBUG") != NULL)
            PyErr_Print();
        PyErr_Clear();
    }
}

static void btns_start_python(void)
{
    Dl_info info;
    char exe[PATH_MAX + 32];
    int have_exe = 0;

    memset(&info, 0, sizeof info);
    if (dladdr((void *)&btns_start_python, &info) != 0 && info.dli_fname != NULL &&
        strlen(info.dli_fname) < sizeof btns_libpath) {
        char dir[PATH_MAX];
        char *slash;
        struct stat st;

        strcpy(btns_libpath, info.dli_fname);
        strcpy(dir, btns_libpath);
        slash = strrchr(dir, '/');          /* <prefix>/lib/libbtns-ipsec.so */
        if (slash != NULL) {
            *slash = '\0';
            slash = strrchr(dir, '/');
            if (slash != NULL) {
                *slash = '\0';              /* <prefix> */
                snprintf(exe, sizeof exe, "%s/bin/python%d.%d", dir, PY_MAJOR_VERSION, PY_MINOR_VERSION);
                have_exe = stat(exe, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & S_IXUSR);
            }
        }
    }

#ifdef BTNS_BUILD_PYTHON
    /* Installed outside the environment it was built for (btns-cabi build --prefix):
     * start the interpreter it was built with, so that environment's btns_vici is found. */
    if (!have_exe) {
        struct stat st;

        snprintf(exe, sizeof exe, "%s", BTNS_BUILD_PYTHON);
        have_exe = stat(exe, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & S_IXUSR);
    }
#endif

    if (!Py_IsInitialized()) {
        PyConfig config;
        PyStatus status;

        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        status = have_exe ? PyConfig_SetBytesString(&config, &config.program_name, exe) : PyStatus_Ok();
        if (!PyStatus_Exception(status))
            status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status) || !Py_IsInitialized()) {
            if (getenv("BTNS_IPSEC_DEBUG") != NULL)
                fprintf(stderr, "libbtns-ipsec: cannot start Python: %s\n", status.err_msg ? status.err_msg : "?");
            btns_core_failed = 1;
            return;
        }
        btns_add_site();
        PyEval_SaveThread(); /* release the GIL; cffi takes it for each call */
    } else {
        PyGILState_STATE gil = PyGILState_Ensure();
        btns_add_site();
        PyGILState_Release(gil);
    }
}

static int btns_enter(void)
{
    pthread_once(&btns_once, btns_start_python);
    return btns_core_failed ? -1 : 0;
}

static int btns_fail(int err)
{
    errno = err;
    return -1;
}

/* The outcome of one call into the core: *err starts as BTNS_ERR_NOCORE, so a
 * core that never ran (failed start-up) is reported, never taken for success. */
#define BTNS_CALL(call)                          \
    do {                                         \
        if (btns_enter() != 0)                   \
            return btns_fail(BTNS_ERR_NOCORE);   \
        call;                                    \
        if (err != 0)                            \
            return btns_fail(err);               \
    } while (0)

/* ---- figures 3 and 7: constructors and destructors ------------------------ */

static uintptr_t btns_create(int kind)
{
    uintptr_t handle = 0;
    int err = BTNS_ERR_NOCORE;

    if (btns_enter() != 0) {
        errno = BTNS_ERR_NOCORE;
        return 0;
    }
    _btns_py_create(kind, &handle, &err);
    if (err != 0 || handle == 0) {
        errno = err != 0 ? err : ENOMEM;
        return 0;
    }
    return handle;
}

ipsec_iToken_t ipsec_create_iToken(void)
{
    return (ipsec_iToken_t)btns_create(BTNS_KIND_ITOKEN);
}

ipsec_pToken_t ipsec_create_pToken(void)
{
    return (ipsec_pToken_t)btns_create(BTNS_KIND_PTOKEN);
}

int ipsec_free_iToken(ipsec_iToken_t p)
{
    int err = BTNS_ERR_NOCORE;

    if (p == NULL)
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_free(BTNS_KIND_ITOKEN, (uintptr_t)p, &err));
    return 0;
}

int ipsec_free_pToken(ipsec_pToken_t p)
{
    int err = BTNS_ERR_NOCORE;

    if (p == NULL)
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_free(BTNS_KIND_PTOKEN, (uintptr_t)p, &err));
    return 0;
}

/* ---- figure 5: attributes --------------------------------------------------- */

int ipsec_get_token_attr(const void *token, uint32_t attr_type, uint32_t *attr_len, void *attr_val)
{
    int err = BTNS_ERR_NOCORE;

    if (token == NULL || attr_len == NULL || (attr_val == NULL && *attr_len != 0))
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_get_attr((uintptr_t)token, attr_type, attr_len, attr_val, &err));
    return 0;
}

int ipsec_set_token_attr(const void *token, uint32_t attr_type, uint32_t attr_len, const void *attr_val)
{
    int err = BTNS_ERR_NOCORE;

    if (token == NULL || attr_val == NULL || attr_len > BTNS_MAX_ATTR_LEN)
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_set_attr((uintptr_t)token, attr_type, attr_len, attr_val, &err));
    return 0;
}

/* ---- figure 9: sockets ------------------------------------------------------ */

int ipsec_set_socket_pToken(int fd, const ipsec_pToken_t pToken)
{
    int err = BTNS_ERR_NOCORE;

    if (pToken == NULL)
        return btns_fail(EINVAL);
    if (fd < 0)
        return btns_fail(EBADF);
    BTNS_CALL(_btns_py_set_socket(fd, (uintptr_t)pToken, &err));
    return 0;
}

int ipsec_get_socket_pToken(int fd, ipsec_pToken_t pToken)
{
    int err = BTNS_ERR_NOCORE;

    if (pToken == NULL)
        return btns_fail(EINVAL);
    if (fd < 0)
        return btns_fail(EBADF);
    BTNS_CALL(_btns_py_get_socket(fd, (uintptr_t)pToken, &err));
    return 0;
}

/* ---- figure 10: datagrams --------------------------------------------------- */

/* Walks control messages without trusting them: every header is copied out
 * (no alignment assumptions) and bounds-checked. Returns 0 at the end (*hdr
 * untouched), 1 with the header and offset set, -1 if malformed. A cmsg_len
 * of 0 ends the list. */
static int btns_next_cmsg(const unsigned char *base, size_t len, size_t *off, struct cmsghdr *hdr)
{
    struct cmsghdr h;

    if (base == NULL || *off >= len || len - *off < sizeof h)
        return 0;
    memcpy(&h, base + *off, sizeof h);
    if (h.cmsg_len == 0)
        return 0;
    if (h.cmsg_len < CMSG_LEN(0) || h.cmsg_len > len - *off)
        return -1;
    *hdr = h;
    return 1;
}

static size_t btns_cmsg_end(size_t off, const struct cmsghdr *hdr, size_t len)
{
    size_t end = off + CMSG_ALIGN(hdr->cmsg_len);
    return end > len ? len : end;
}

int ipsec_set_msg_pToken(struct msghdr *msg, const ipsec_pToken_t pToken)
{
    int err = BTNS_ERR_NOCORE;
    unsigned char *base;
    size_t cap, off = 0, found = (size_t)-1;
    struct cmsghdr hdr;
    uint64_t handle = (uint64_t)(uintptr_t)pToken;
    int r;

    if (msg == NULL || pToken == NULL)
        return btns_fail(EINVAL);
    if (msg->msg_control == NULL && msg->msg_controllen != 0)
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_check(BTNS_KIND_PTOKEN, (uintptr_t)pToken, &err));
    base = msg->msg_control;
    cap = msg->msg_controllen;
    while ((r = btns_next_cmsg(base, cap, &off, &hdr)) == 1) {
        if (hdr.cmsg_level == IPSEC_CMSG_PTOKEN_LEVEL && hdr.cmsg_type == IPSEC_CMSG_PTOKEN &&
            hdr.cmsg_len == CMSG_LEN(sizeof handle))
            found = off;
        off = btns_cmsg_end(off, &hdr, cap);
    }
    if (r < 0)
        return btns_fail(EINVAL);
    if (found != (size_t)-1) {
        memcpy(base + found + CMSG_LEN(0), &handle, sizeof handle);
    } else {
        if (base == NULL || off > cap || cap - off < CMSG_SPACE(sizeof handle))
            return btns_fail(ENOBUFS);
        memset(&hdr, 0, sizeof hdr);
        hdr.cmsg_len = CMSG_LEN(sizeof handle);
        hdr.cmsg_level = IPSEC_CMSG_PTOKEN_LEVEL;
        hdr.cmsg_type = IPSEC_CMSG_PTOKEN;
        memset(base + off, 0, CMSG_SPACE(sizeof handle));
        memcpy(base + off, &hdr, sizeof hdr);
        memcpy(base + off + CMSG_LEN(0), &handle, sizeof handle);
        off += CMSG_SPACE(sizeof handle);
    }
    msg->msg_controllen = off;
    return 0;
}

/* family/address(16 bytes, IPv4 in the first 4)/port of a sockaddr; -1 if unusable. */
static int btns_parse_sockaddr(const void *sa, size_t len, int *family, unsigned char addr[16], int *port)
{
    sa_family_t fam;

    if (sa == NULL || len < sizeof fam)
        return -1;
    memcpy(&fam, sa, sizeof fam);
    memset(addr, 0, 16);
    if (fam == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in sin;
        memcpy(&sin, sa, sizeof sin);
        memcpy(addr, &sin.sin_addr, 4);
        *port = ntohs(sin.sin_port);
    } else if (fam == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, sa, sizeof sin6);
        memcpy(addr, &sin6.sin6_addr, 16);
        *port = ntohs(sin6.sin6_port);
    } else {
        return -1;
    }
    *family = fam;
    return 0;
}

int ipsec_get_msg_pToken(const struct msghdr *msg, ipsec_pToken_t pToken)
{
    int err = BTNS_ERR_NOCORE;
    int rfamily = 0, rport = 0, lfamily = 0, lport = 0, r, ifindex = -1;
    uint64_t ns[2] = {0, 0};
    uint64_t receiver[3] = {UINT64_MAX, 0, 0};
    unsigned char raddr[16], laddr[16];
    const unsigned char *base;
    size_t off = 0;
    struct cmsghdr hdr;

    if (msg == NULL || pToken == NULL)
        return btns_fail(EINVAL);
    if (btns_parse_sockaddr(msg->msg_name, msg->msg_namelen, &rfamily, raddr, &rport) != 0)
        return btns_fail(EINVAL);
    base = msg->msg_control;
    memset(laddr, 0, sizeof laddr);
    while ((r = btns_next_cmsg(base, msg->msg_controllen, &off, &hdr)) == 1) {
        const unsigned char *data = base + off + CMSG_LEN(0);
        size_t dlen = hdr.cmsg_len - CMSG_LEN(0);
        if (hdr.cmsg_level == IPPROTO_IP && hdr.cmsg_type == IP_PKTINFO && dlen >= sizeof(struct in_pktinfo)) {
            struct in_pktinfo pi;
            memcpy(&pi, data, sizeof pi);
            memset(laddr, 0, sizeof laddr);
            memcpy(laddr, &pi.ipi_addr, 4);
            lfamily = AF_INET;
            ifindex = pi.ipi_ifindex;
        } else if (hdr.cmsg_level == IPPROTO_IPV6 && hdr.cmsg_type == IPV6_PKTINFO &&
                   dlen >= sizeof(struct in6_pktinfo)) {
            struct in6_pktinfo pi6;
            memcpy(&pi6, data, sizeof pi6);
            memcpy(laddr, &pi6.ipi6_addr, 16);
            lfamily = AF_INET6;
            ifindex = (int)pi6.ipi6_ifindex;
        } else if (hdr.cmsg_level == SOL_BTNS && hdr.cmsg_type == IPSEC_CMSG_LOCALPORT && dlen >= sizeof(uint16_t)) {
            uint16_t p16;
            memcpy(&p16, data, sizeof p16);
            lport = p16;
        } else if (hdr.cmsg_level == SOL_BTNS && hdr.cmsg_type == IPSEC_CMSG_NETNS && dlen >= sizeof ns) {
            memcpy(ns, data, sizeof ns);
        } else if (hdr.cmsg_level == SOL_BTNS && hdr.cmsg_type == IPSEC_CMSG_RECEIVER && dlen >= sizeof receiver) {
            memcpy(receiver, data, sizeof receiver);
        }
        off = btns_cmsg_end(off, &hdr, msg->msg_controllen);
    }
    if (r < 0 || lfamily == 0)
        return btns_fail(EINVAL);
    /* The receiving socket (only for btnsd, which answers for a socket it receives): -1 when unknown. */
    BTNS_CALL(_btns_py_fill_flow((uintptr_t)pToken, IPPROTO_UDP, lfamily, laddr, lport, rfamily, raddr, rport,
                                 ifindex, ns[0], ns[1], receiver[0] > INT32_MAX ? -1 : (int)receiver[0],
                                 receiver[1], receiver[2], &err));
    return 0;
}

/* ---- figures 11 and 12 ------------------------------------------------------ */

int ipsec_cmp_pToken(ipsec_pToken_t p1, ipsec_pToken_t p2)
{
    int err = BTNS_ERR_NOCORE, result = 1;

    if (p1 == NULL || p2 == NULL)
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_cmp((uintptr_t)p1, (uintptr_t)p2, &result, &err));
    return result == 0 ? 0 : 1;
}

int ipsec_dup_pToken(const ipsec_pToken_t p, ipsec_pToken_t *p_dup)
{
    int err = BTNS_ERR_NOCORE;
    uintptr_t out = 0;

    if (p == NULL || p_dup == NULL)
        return btns_fail(EINVAL);
    *p_dup = NULL;
    BTNS_CALL(_btns_py_dup((uintptr_t)p, &out, &err));
    *p_dup = (ipsec_pToken_t)out;
    return 0;
}

/* ---- extensions ------------------------------------------------------------- */

ipsec_iToken_t ipsec_import_iToken(const void *buf, uint32_t len)
{
    int err = BTNS_ERR_NOCORE;
    uintptr_t out = 0;

    if (buf == NULL || len > BTNS_MAX_ATTR_LEN) {
        errno = EINVAL;
        return NULL;
    }
    if (btns_enter() != 0) {
        errno = BTNS_ERR_NOCORE;
        return NULL;
    }
    _btns_py_import(buf, len, &out, &err);
    if (err != 0 || out == 0) {
        errno = err != 0 ? err : ENOMEM;
        return NULL;
    }
    return (ipsec_iToken_t)out;
}

int ipsec_export_iToken(const ipsec_iToken_t t, uint32_t *len, void *buf)
{
    int err = BTNS_ERR_NOCORE;

    if (t == NULL || len == NULL || (buf == NULL && *len != 0))
        return btns_fail(EINVAL);
    BTNS_CALL(_btns_py_export((uintptr_t)t, len, buf, &err));
    return 0;
}

ssize_t ipsec_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    int err = BTNS_ERR_NOCORE, r;
    const unsigned char *base;
    unsigned char *copy = NULL;
    size_t off = 0, used = 0;
    struct cmsghdr hdr;
    uint64_t handle = 0;
    int have_token = 0, oif = 0, has_mark = 0;
    uint32_t mark = 0;
    struct msghdr out;
    ssize_t n;
    int saved;

    if (msg == NULL || (msg->msg_control == NULL && msg->msg_controllen != 0))
        return btns_fail(EINVAL);
    base = msg->msg_control;
    if (msg->msg_controllen > 0) {
        copy = calloc(1, msg->msg_controllen);
        if (copy == NULL)
            return btns_fail(ENOMEM);
    }
    while ((r = btns_next_cmsg(base, msg->msg_controllen, &off, &hdr)) == 1) {
        size_t end = btns_cmsg_end(off, &hdr, msg->msg_controllen);
        if (hdr.cmsg_level == SOL_BTNS ||
            (hdr.cmsg_level == IPSEC_CMSG_PTOKEN_LEVEL && hdr.cmsg_type == IPSEC_CMSG_PTOKEN)) {
            if (hdr.cmsg_level == IPSEC_CMSG_PTOKEN_LEVEL && hdr.cmsg_len == CMSG_LEN(sizeof handle)) {
                memcpy(&handle, base + off + CMSG_LEN(0), sizeof handle);
                have_token = 1;
            }
        } else {
            const unsigned char *data = base + off + CMSG_LEN(0);
            size_t dlen = hdr.cmsg_len - CMSG_LEN(0);
            /* per-message routing keys: the check must see what the kernel will apply */
            if (hdr.cmsg_level == IPPROTO_IP && hdr.cmsg_type == IP_PKTINFO && dlen >= sizeof(struct in_pktinfo)) {
                struct in_pktinfo pi;
                memcpy(&pi, data, sizeof pi);
                oif = pi.ipi_ifindex;
            } else if (hdr.cmsg_level == IPPROTO_IPV6 && hdr.cmsg_type == IPV6_PKTINFO &&
                       dlen >= sizeof(struct in6_pktinfo)) {
                struct in6_pktinfo pi6;
                memcpy(&pi6, data, sizeof pi6);
                oif = (int)pi6.ipi6_ifindex;
            } else if (hdr.cmsg_level == SOL_SOCKET && hdr.cmsg_type == SO_MARK && dlen >= sizeof mark) {
                memcpy(&mark, data, sizeof mark);
                has_mark = 1;
            }
            memcpy(copy + used, base + off, end - off);
            used += end - off;
        }
        off = end;
    }
    if (r < 0) {
        free(copy);
        return btns_fail(EINVAL);
    }
    if (have_token) {
        int family = 0, port = 0, has_dest = 0;
        unsigned char addr[16];

        memset(addr, 0, sizeof addr);
        if (msg->msg_name != NULL) {
            if (btns_parse_sockaddr(msg->msg_name, msg->msg_namelen, &family, addr, &port) != 0) {
                free(copy);
                return btns_fail(EINVAL);
            }
            has_dest = 1;
        }
        if (handle == 0 || btns_enter() != 0) {
            free(copy);
            return btns_fail(handle == 0 ? EINVAL : BTNS_ERR_NOCORE);
        }
        _btns_py_check_send(fd, (uintptr_t)handle, has_dest, family, addr, port, oif, has_mark, mark,
                            (flags & MSG_DONTROUTE) != 0, &err);
        if (err != 0) {
            free(copy);
            return btns_fail(err);
        }
    }
    out = *msg;
    out.msg_control = used > 0 ? copy : NULL;
    out.msg_controllen = used;
    n = sendmsg(fd, &out, flags);
    saved = errno;
    free(copy);
    errno = saved;
    return n;
}

ssize_t ipsec_recvmsg(int fd, struct msghdr *msg, int flags)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int one = 1, port = 0, family = 0;
    unsigned char addr[16];
    size_t cap, off;
    ssize_t n;

    if (msg == NULL || (msg->msg_control == NULL && msg->msg_controllen != 0))
        return btns_fail(EINVAL);
    memset(&ss, 0, sizeof ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0)
        return -1;
    if (btns_parse_sockaddr(&ss, sl, &family, addr, &port) != 0)
        return btns_fail(EAFNOSUPPORT);
    if (family == AF_INET) {
        if (setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof one) != 0)
            return -1;
    } else if (setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one) != 0) {
        return -1;
    }
    cap = msg->msg_controllen;
    n = recvmsg(fd, msg, flags);
    if (n < 0)
        return n;
    off = CMSG_ALIGN(msg->msg_controllen);
    if (msg->msg_control != NULL && !(msg->msg_flags & MSG_CTRUNC) && off <= cap &&
        cap - off >= CMSG_SPACE(sizeof(uint16_t))) {
        struct cmsghdr hdr;
        uint16_t p16 = (uint16_t)port;
        unsigned char *base = msg->msg_control;

        memset(&hdr, 0, sizeof hdr);
        hdr.cmsg_len = CMSG_LEN(sizeof p16);
        hdr.cmsg_level = SOL_BTNS;
        hdr.cmsg_type = IPSEC_CMSG_LOCALPORT;
        memset(base + off, 0, CMSG_SPACE(sizeof p16));
        memcpy(base + off, &hdr, sizeof hdr);
        memcpy(base + off + CMSG_LEN(0), &p16, sizeof p16);
        msg->msg_controllen = off + CMSG_SPACE(sizeof p16);
        off = msg->msg_controllen;
        if (cap - off >= CMSG_SPACE(2 * sizeof(uint64_t))) {
            uint64_t ns[2];
            struct stat st;
            int nsfd = ioctl(fd, SIOCGSKNS);

            if (nsfd >= 0 && fstat(nsfd, &st) == 0) {
                ns[0] = (uint64_t)st.st_dev;
                ns[1] = (uint64_t)st.st_ino;
                memset(&hdr, 0, sizeof hdr);
                hdr.cmsg_len = CMSG_LEN(sizeof ns);
                hdr.cmsg_level = SOL_BTNS;
                hdr.cmsg_type = IPSEC_CMSG_NETNS;
                memset(base + off, 0, CMSG_SPACE(sizeof ns));
                memcpy(base + off, &hdr, sizeof hdr);
                memcpy(base + off + CMSG_LEN(0), ns, sizeof ns);
                msg->msg_controllen = off + CMSG_SPACE(sizeof ns);
            }
            if (nsfd >= 0)
                close(nsfd);
        }
        off = msg->msg_controllen;
        if (cap - off >= CMSG_SPACE(3 * sizeof(uint64_t))) {
            uint64_t rcv[3];
            struct stat st;

            if (fstat(fd, &st) == 0) { /* the receiving socket, for btnsd: fd and identity */
                rcv[0] = (uint64_t)fd;
                rcv[1] = (uint64_t)st.st_dev;
                rcv[2] = (uint64_t)st.st_ino;
                memset(&hdr, 0, sizeof hdr);
                hdr.cmsg_len = CMSG_LEN(sizeof rcv);
                hdr.cmsg_level = SOL_BTNS;
                hdr.cmsg_type = IPSEC_CMSG_RECEIVER;
                memset(base + off, 0, CMSG_SPACE(sizeof rcv));
                memcpy(base + off, &hdr, sizeof hdr);
                memcpy(base + off + CMSG_LEN(0), rcv, sizeof rcv);
                msg->msg_controllen = off + CMSG_SPACE(sizeof rcv);
            }
        }
    }
    return n;
}
