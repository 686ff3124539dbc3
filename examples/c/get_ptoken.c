/*
 * get_ptoken - example 1: connect over TCP, get the connection's pToken
 * (ipsec_get_socket_pToken, figure 9) and print every attribute, the peer's
 * iToken and ours included.
 *
 *   get_ptoken HOST PORT [ITOKEN_FILE]
 *
 * ITOKEN_FILE receives the peer's serialized iToken (the value of
 * IPSEC_API_ATTR_iToken), e.g. for itoken_attrs or to pin the peer later.
 * Backend: $BTNS_VICI_SOCKET (strongSwan's VICI socket), see README "C ABI".
 *
 *   cc -std=c99 get_ptoken.c $(pkg-config --cflags --libs btns-ipsec)
 */
#define _POSIX_C_SOURCE 200809L
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "btns_example.h"

static int connect_tcp(const char *host, const char *port)
{
    struct addrinfo hints, *res, *ai;
    int fd = -1, rc;

    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv)
{
    ipsec_pToken_t p;
    int fd;

    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s HOST PORT [ITOKEN_FILE]\n", argv[0]);
        return 2;
    }
    fd = connect_tcp(argv[1], argv[2]);
    if (fd < 0) {
        perror("connect");
        return 1;
    }
    p = ipsec_create_pToken();
    if (p == NULL) {
        perror("ipsec_create_pToken");
        return 1;
    }
    if (ipsec_get_socket_pToken(fd, p) != 0) {
        fprintf(stderr, "ipsec_get_socket_pToken: %s (errno %d)\n", strerror(errno), errno);
        return 1;
    }
    ex_print_ptoken(p);
    if (argc == 4) {
        void *raw = NULL;
        uint32_t len = 0;
        ipsec_iToken_t t = ex_itoken_of(p, IPSEC_API_ATTR_iToken, &raw, &len);
        FILE *f;

        if (t == NULL) {
            fprintf(stderr, "no peer iToken: %s\n", strerror(errno));
            return 1;
        }
        f = fopen(argv[3], "wb");
        if (f == NULL || fwrite(raw, 1, len, f) != len || fclose(f) != 0) {
            perror(argv[3]);
            return 1;
        }
        printf("saved: %u bytes to %s\n", (unsigned)len, argv[3]);
        free(raw);
        ipsec_free_iToken(t);
    }
    if (ipsec_free_pToken(p) != 0) {
        perror("ipsec_free_pToken");
        return 1;
    }
    close(fd);
    return 0;
}
