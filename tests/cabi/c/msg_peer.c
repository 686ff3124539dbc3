/*
 * msg_peer.c - one end of a datagram exchange with pTokens (figure 10).
 *
 *   msg_peer recv ADDR PORT          receive one datagram (ipsec_recvmsg), print its pToken
 *   msg_peer send ADDR PORT LEVEL    send "hello" with a pToken demanding privacy >= LEVEL
 *                                    (3 low, 4 medium, 5 high) through ipsec_sendmsg
 *
 * Output: "name: value" lines; the receiver prints "ready: 1" once it listens.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <ipsec_api.h>

static socklen_t make_addr(const char *addr, const char *port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (inet_pton(AF_INET6, addr, &((struct sockaddr_in6 *)ss)->sin6_addr) == 1) {
        ss->ss_family = AF_INET6;
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)atoi(port));
        return sizeof(struct sockaddr_in6);
    }
    if (inet_pton(AF_INET, addr, &((struct sockaddr_in *)ss)->sin_addr) == 1) {
        ss->ss_family = AF_INET;
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)atoi(port));
        return sizeof(struct sockaddr_in);
    }
    fprintf(stderr, "bad address %s\n", addr);
    exit(2);
}

static int do_recv(const char *addr, const char *port)
{
    struct sockaddr_storage me, from;
    socklen_t len = make_addr(addr, port, &me);
    union {
        struct cmsghdr align;
        unsigned char bytes[512];
    } ctl;
    struct timeval tv = {10, 0};
    char data[64], name[256], info[4096];
    struct iovec iov = {data, sizeof data};
    struct msghdr msg;
    ipsec_pToken_t p;
    uint16_t v = 0;
    uint32_t vlen = sizeof v, nlen = sizeof name, ilen = sizeof info;
    ssize_t n;
    int one = 1;
    int fd = socket(me.ss_family, SOCK_DGRAM, 0);

    if (fd < 0 || bind(fd, (struct sockaddr *)&me, len) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) {
        perror("socket");
        return 1;
    }
    /* Before announcing readiness: the kernel records the arrival device only for datagrams
     * queued after IP_PKTINFO / IPV6_RECVPKTINFO is on (ipsec_recvmsg turns it on too, late). */
    if (me.ss_family == AF_INET ? setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof one)
                                : setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one)) {
        perror("pktinfo");
        return 1;
    }
    printf("ready: 1\n");
    fflush(stdout);
    memset(&msg, 0, sizeof msg);
    memset(&ctl, 0, sizeof ctl);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_control = ctl.bytes;
    msg.msg_controllen = sizeof ctl.bytes;
    n = ipsec_recvmsg(fd, &msg, 0);
    printf("recvmsg: %zd\n", n);
    if (n < 0)
        return 1;
    p = ipsec_create_pToken();
    if (ipsec_get_msg_pToken(&msg, p) != 0) {
        printf("get_msg_pToken: -1 errno %d %s\n", errno, strerror(errno));
        return 1;
    }
    printf("get_msg_pToken: 0\n");
    ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, &vlen, &v);
    printf("privacyProtected: %u\n", (unsigned)v);
    if (ipsec_get_token_attr(p, IPSEC_API_ATTR_policyName, &nlen, name) == 0)
        printf("policyName: %s\n", name);
    if (ipsec_get_token_attr(p, IPSEC_API_ATTR_informationString, &ilen, info) == 0)
        printf("informationString: %s\n", info);
    ipsec_free_pToken(p);
    close(fd);
    return 0;
}

static int do_send(const char *addr, const char *port, uint16_t level)
{
    struct sockaddr_storage to;
    socklen_t len = make_addr(addr, port, &to);
    union {
        struct cmsghdr align;
        unsigned char bytes[IPSEC_MSG_PTOKEN_SPACE];
    } ctl;
    struct iovec iov = {"hello", 5};
    struct msghdr msg;
    ipsec_pToken_t demand = ipsec_create_pToken();
    ssize_t n;
    int fd = socket(to.ss_family, SOCK_DGRAM, 0);

    if (fd < 0 || demand == NULL || ipsec_set_token_attr(demand, IPSEC_API_ATTR_privacyProtected, 2, &level) != 0) {
        perror("setup");
        return 1;
    }
    memset(&msg, 0, sizeof msg);
    memset(&ctl, 0, sizeof ctl);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_name = &to;
    msg.msg_namelen = len;
    msg.msg_control = ctl.bytes;
    msg.msg_controllen = sizeof ctl.bytes;
    if (ipsec_set_msg_pToken(&msg, demand) != 0) {
        printf("set_msg_pToken: -1 errno %d %s\n", errno, strerror(errno));
        return 1;
    }
    n = ipsec_sendmsg(fd, &msg, 0);
    if (n >= 0)
        printf("sendmsg: %zd\n", n);
    else
        printf("sendmsg: -1 errno %d %s\n", errno, strerror(errno));
    ipsec_free_pToken(demand);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "recv") == 0)
        return do_recv(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "send") == 0)
        return do_send(argv[2], argv[3], (uint16_t)atoi(argv[4]));
    fprintf(stderr, "usage: %s recv ADDR PORT | send ADDR PORT LEVEL\n", argv[0]);
    return 2;
}
