/* ipsec_set_socket_pToken, then a PLAIN connect(2): no wrapper, no other library call (issue 16).
 * Usage: plain_connect HOST PORT. Demands BTNS (raw keys), privacy >= LEVEL_MEDIUM, integrity,
 * transport mode. On success it sends a marker, reads the echo, prints the pToken's privacy
 * level and "ready", then blocks in recv(2) and reports how that call ended (a broken latch:
 * ECONNABORTED). On failure: "connect errno N NAME", exit 1. */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <ipsec_api.h>

static int set16(void *tok, uint32_t attr, uint16_t v)
{
    return ipsec_set_token_attr(tok, attr, sizeof v, &v);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    ipsec_iToken_t it = ipsec_create_iToken();
    ipsec_pToken_t p = ipsec_create_pToken();
    if (!it || !p || set16(it, IPSEC_API_ATTR_authMeth_BTNS, IPSEC_API_ATTR_ENABLE)
        || set16(it, IPSEC_API_ATTR_authMeth_LEAPOFFAITH, IPSEC_API_ATTR_ENABLE)
        || set16(p, IPSEC_API_ATTR_privacyProtected, IPSEC_API_ATTR_LEVEL_MEDIUM)
        || set16(p, IPSEC_API_ATTR_integrityProtected, IPSEC_API_ATTR_ENABLE)
        || set16(p, IPSEC_API_ATTR_tunnelMode, IPSEC_API_ATTR_DISABLE)) {
        printf("token errno %d\n", errno);
        return 3;
    }
    unsigned char buf[4096];
    uint32_t len = sizeof buf;
    if (ipsec_export_iToken(it, &len, buf) || ipsec_set_token_attr(p, IPSEC_API_ATTR_iToken, len, buf)) {
        printf("itoken errno %d\n", errno);
        return 3;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (ipsec_set_socket_pToken(fd, p) != 0) {
        printf("set_socket_pToken errno %d %s\n", errno, strerror(errno));
        return 4;
    }
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &sin.sin_addr);
    double t0 = now();
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) != 0) { /* the plain system call */
        int e = errno;
        printf("connect errno %d %s after %.3f s\n", e, e == ECONNABORTED ? "ECONNABORTED" : strerror(e), now() - t0);
        return 1;
    }
    printf("connected after %.3f s\n", now() - t0);
    const char *marker = "plain-connect-from-c-marker";
    if (send(fd, marker, strlen(marker), 0) != (ssize_t)strlen(marker)) {
        printf("send errno %d\n", errno);
        return 5;
    }
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    printf("echo %zd\n", n);
    ipsec_pToken_t got = ipsec_create_pToken();
    uint16_t level = 0;
    uint32_t llen = sizeof level;
    if (ipsec_get_socket_pToken(fd, got) || ipsec_get_token_attr(got, IPSEC_API_ATTR_privacyProtected, &llen, &level)) {
        printf("get_socket_pToken errno %d\n", errno);
        return 6;
    }
    printf("privacy %u\nready\n", level);
    fflush(stdout);
    for (;;) {
        n = recv(fd, buf, sizeof buf, 0);
        if (n > 0)
            continue;
        if (n == 0) {
            printf("eof\n");
            return 7;
        }
        int e = errno;
        printf("recv errno %d %s\n", e, e == ECONNABORTED ? "ECONNABORTED" : strerror(e));
        return e == ECONNABORTED ? 0 : 8;
    }
}
