/*
 * set_socket_ptoken - example 3: demand protection for a TCP socket
 * (ipsec_set_socket_pToken, figure 9), connect, and check what was obtained.
 *
 *   set_socket_ptoken HOST PORT [LEVEL [PEER_ITOKEN_FILE]]
 *
 * LEVEL: low | medium (default) | high, the privacy level demanded; integrity
 * must be present. PEER_ITOKEN_FILE pins the peer: a serialized iToken saved
 * from an earlier connection (get_ptoken HOST PORT FILE). Otherwise the peer
 * must be authenticated by BTNS or leap of faith.
 *
 * Exit status: 0 protected as demanded; 1 error; 2 usage; 3 refused by
 * ipsec_set_socket_pToken; 4 connect failed; 5 connected but not as demanded.
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "btns_example.h"

static int set_u16(const void *token, uint32_t attr, uint16_t v)
{
    return ipsec_set_token_attr(token, attr, sizeof v, &v);
}

static int read_file(const char *path, unsigned char *buf, size_t cap, uint32_t *len)
{
    FILE *f = fopen(path, "rb");
    size_t n;

    if (f == NULL)
        return -1;
    n = fread(buf, 1, cap, f);
    fclose(f);
    *len = (uint32_t)n;
    return 0;
}

int main(int argc, char **argv)
{
    struct addrinfo hints, *ai;
    ipsec_pToken_t demand, got;
    ipsec_iToken_t peer;
    uint16_t level = IPSEC_API_ATTR_LEVEL_MEDIUM, v = 0;
    uint32_t len;
    unsigned char pin[32768];
    int fd, rc;

    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s HOST PORT [low|medium|high [PEER_ITOKEN_FILE]]\n", argv[0]);
        return 2;
    }
    if (argc >= 4)
        level = strcmp(argv[3], "low") == 0    ? IPSEC_API_ATTR_LEVEL_LOW
                : strcmp(argv[3], "high") == 0 ? IPSEC_API_ATTR_LEVEL_HIGH
                                               : IPSEC_API_ATTR_LEVEL_MEDIUM;

    /* The demand: privacy >= level, integrity present, and who the peer may be. */
    demand = ipsec_create_pToken();
    if (demand == NULL || set_u16(demand, IPSEC_API_ATTR_privacyProtected, level) != 0 ||
        set_u16(demand, IPSEC_API_ATTR_integrityProtected, IPSEC_API_ATTR_ENABLE) != 0) {
        perror("pToken");
        return 1;
    }
    if (argc == 5) {
        if (read_file(argv[4], pin, sizeof pin, &len) != 0) {
            perror(argv[4]);
            return 1;
        }
        if (ipsec_set_token_attr(demand, IPSEC_API_ATTR_iToken, len, pin) != 0) {
            perror("ipsec_set_token_attr(iToken)");
            return 1;
        }
        printf("demand: privacy >= %s, peer pinned (%u bytes)\n", ex_setting_name(level), (unsigned)len);
    } else {
        ipsec_iToken_t t = ipsec_create_iToken();
        if (t == NULL || set_u16(t, IPSEC_API_ATTR_authMeth_BTNS, IPSEC_API_ATTR_ENABLE) != 0 ||
            set_u16(t, IPSEC_API_ATTR_authMeth_LEAPOFFAITH, IPSEC_API_ATTR_ENABLE) != 0) {
            perror("iToken");
            return 1;
        }
        len = sizeof pin;
        if (ipsec_export_iToken(t, &len, pin) != 0 ||
            ipsec_set_token_attr(demand, IPSEC_API_ATTR_iToken, len, pin) != 0) {
            perror("iToken template");
            return 1;
        }
        ipsec_free_iToken(t);
        printf("demand: privacy >= %s, peer by BTNS or leap of faith\n", ex_setting_name(level));
    }

    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo: %s\n", gai_strerror(rc));
        return 1;
    }
    fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    if (ipsec_set_socket_pToken(fd, demand) != 0) {
        printf("ipsec_set_socket_pToken: %s (errno %d)\n", strerror(errno), errno);
        return 3;
    }
    printf("ipsec_set_socket_pToken: 0\n");
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        printf("connect: %s (errno %d)\n", strerror(errno), errno);
        return 4;
    }
    freeaddrinfo(ai);

    got = ipsec_create_pToken();
    if (got == NULL || ipsec_get_socket_pToken(fd, got) != 0) {
        printf("ipsec_get_socket_pToken: %s (errno %d)\n", strerror(errno), errno);
        return 1;
    }
    ex_print_ptoken(got);
    len = sizeof v;
    if (ipsec_get_token_attr(got, IPSEC_API_ATTR_privacyProtected, &len, &v) != 0)
        return 1;
    peer = ex_itoken_of(got, IPSEC_API_ATTR_iToken, NULL, NULL);
    rc = (v >= level && v <= IPSEC_API_ATTR_LEVEL_HIGH && peer != NULL) ? 0 : 5;
    printf("result: %s\n", rc == 0 ? "protected as demanded" : "NOT protected as demanded");
    if (peer != NULL)
        ipsec_free_iToken(peer);
    ipsec_free_pToken(got);
    ipsec_free_pToken(demand);
    close(fd);
    return rc;
}
