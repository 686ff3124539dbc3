/* A program that knows nothing about IPsec: it holds a connected TCP socket (inherited as
 * fd argv[1]), says "ready", then blocks in recv(2) and reports how the call ended.
 * Used to show that a broken latch ends the connection in the kernel for any program. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s FD\n", argv[0]);
        return 2;
    }
    int fd = atoi(argv[1]);
    char buf[256];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            printf("data %zd\n", n);
            fflush(stdout);
            continue;
        }
        if (n == 0) {
            printf("eof\n");
            return 1;
        }
        int e = errno;
        printf("recv errno %d %s\n", e, e == ECONNABORTED ? "ECONNABORTED" : strerror(e));
        ssize_t s = send(fd, "x", 1, MSG_NOSIGNAL);
        int e2 = errno;
        printf("send %zd errno %d %s\n", s, s < 0 ? e2 : 0, s < 0 && e2 == ECONNABORTED ? "ECONNABORTED" : "");
        return e == ECONNABORTED ? 0 : 1;
    }
}
