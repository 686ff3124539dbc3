/*
 * msg_udp.c - the datagram functions (figure 10) and the ipsec_sendmsg /
 * ipsec_recvmsg extensions over real UDP sockets.
 *
 *   msg_udp ADDR
 *
 * ADDR: the local IPv4 or IPv6 address to use (127.0.0.1 or ::1 without a
 * testbed; an address of this namespace otherwise). Sends a datagram from one socket to another and
 * prints "name: value" lines: what ipsec_recvmsg recorded, the result of
 * ipsec_get_msg_pToken (privacyProtected, or the errno), and what
 * ipsec_sendmsg does with an attached pToken that demands privacy.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ipsec_api.h>

static socklen_t addr_len(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

static int port_of(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

static int udp_socket(const char *addr, struct sockaddr_storage *bound)
{
    socklen_t sl = sizeof *bound;
    int fd;

    memset(bound, 0, sizeof *bound);
    if (inet_pton(AF_INET6, addr, &((struct sockaddr_in6 *)bound)->sin6_addr) == 1)
        bound->ss_family = AF_INET6;
    else if (inet_pton(AF_INET, addr, &((struct sockaddr_in *)bound)->sin_addr) == 1)
        bound->ss_family = AF_INET;
    else {
        fprintf(stderr, "bad address %s\n", addr);
        exit(2);
    }
    fd = socket(bound->ss_family, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)bound, addr_len(bound)) != 0 ||
        getsockname(fd, (struct sockaddr *)bound, &sl) != 0) {
        perror("udp socket");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv)
{
    struct sockaddr_storage a, b, from;
    union {
        struct cmsghdr align;
        unsigned char bytes[512];
    } ctl;
    char data[64];
    struct iovec iov;
    struct msghdr msg;
    struct cmsghdr *c;
    ipsec_pToken_t p, demand;
    uint16_t v = 0;
    uint32_t len;
    ssize_t n;
    int sa, sb, have_pktinfo = 0, localport = -1;

    if (argc != 2) {
        fprintf(stderr, "usage: %s ADDR\n", argv[0]);
        return 2;
    }
    sa = udp_socket(argv[1], &a);
    sb = udp_socket(argv[1], &b);

    /* plain ipsec_sendmsg: no pToken attached, sent as is */
    memset(&msg, 0, sizeof msg);
    iov.iov_base = "hello";
    iov.iov_len = 5;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_name = &b;
    msg.msg_namelen = addr_len(&b);
    n = ipsec_sendmsg(sa, &msg, 0);
    printf("sendmsg_plain: %zd\n", n);

    /* ipsec_recvmsg records the local address (IP_PKTINFO) and port */
    memset(&msg, 0, sizeof msg);
    memset(&ctl, 0, sizeof ctl);
    iov.iov_base = data;
    iov.iov_len = sizeof data;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_control = ctl.bytes;
    msg.msg_controllen = sizeof ctl.bytes;
    n = ipsec_recvmsg(sb, &msg, 0);
    printf("recvmsg: %zd\n", n);
    for (c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) ||
            (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO))
            have_pktinfo = 1;
        if (c->cmsg_level == SOL_BTNS && c->cmsg_type == IPSEC_CMSG_LOCALPORT) {
            uint16_t port;
            memcpy(&port, CMSG_DATA(c), sizeof port);
            localport = port;
        }
    }
    printf("pktinfo: %d\n", have_pktinfo);
    printf("localport_ok: %d\n", localport == port_of(&b));
    printf("source_ok: %d\n", port_of(&from) == port_of(&a) && from.ss_family == a.ss_family);

    p = ipsec_create_pToken();
    if (ipsec_get_msg_pToken(&msg, p) == 0) {
        len = sizeof v;
        ipsec_get_token_attr(p, IPSEC_API_ATTR_privacyProtected, &len, &v);
        printf("get_msg_pToken: 0\n");
        printf("privacyProtected: %u\n", (unsigned)v);
    } else {
        printf("get_msg_pToken: -1 errno %d %s\n", errno, strerror(errno));
    }

    /* a pToken demanding privacy, attached with ipsec_set_msg_pToken */
    demand = ipsec_create_pToken();
    v = IPSEC_API_ATTR_LEVEL_LOW;
    ipsec_set_token_attr(demand, IPSEC_API_ATTR_privacyProtected, sizeof v, &v);
    memset(&msg, 0, sizeof msg);
    memset(&ctl, 0, sizeof ctl);
    iov.iov_base = "secret";
    iov.iov_len = 6;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_name = &b;
    msg.msg_namelen = addr_len(&b);
    msg.msg_control = ctl.bytes;
    msg.msg_controllen = sizeof ctl.bytes;
    printf("set_msg_pToken: %d\n", ipsec_set_msg_pToken(&msg, demand));
    n = ipsec_sendmsg(sa, &msg, 0);
    if (n >= 0)
        printf("sendmsg_demand: %zd\n", n);
    else
        printf("sendmsg_demand: -1 errno %d %s\n", errno, strerror(errno));
    n = recv(sb, data, sizeof data, MSG_DONTWAIT);
    printf("received_after_demand: %zd\n", n);

    ipsec_free_pToken(p);
    ipsec_free_pToken(demand);
    close(sa);
    close(sb);
    return 0;
}
