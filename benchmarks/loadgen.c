/* loadgen: btnsd load from C clients, written from README "btnsd: the broker" (wire protocol) alone.
 *
 *   cc -O2 -o loadgen benchmarks/loadgen.c
 *   loadgen SOCKET_PATH FD CLIENTS SECONDS
 *
 * FD is an inherited socket (the one asked about). CLIENTS processes each open their own
 * SOCK_SEQPACKET connection to btnsd, wait for a common start, then for SECONDS send the hot
 * request (get_socket_ptoken, payload exactly {"op":"get_socket_ptoken"}, FD as one SCM_RIGHTS
 * descriptor) and read its response (kind 2, the request's id), one at a time. Prints one line:
 *   queries=N ok=N errors=N timeouts=N clients=C seconds=S qps=R
 * ok counts responses whose payload starts {"ok":true; errors the other responses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 65536
static const char BODY[] = "{\"op\":\"get_socket_ptoken\"}";

struct tally {
	uint64_t queries, ok, errors, timeouts;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int dial(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct timeval tv = {.tv_sec = 5};
	if (s < 0 || strlen(path) >= sizeof sa.sun_path)
		return -1;
	strcpy(sa.sun_path, path);
	for (int tries = 0; connect(s, (struct sockaddr *)&sa, sizeof sa) < 0; tries++) {
		if (errno != EAGAIN || tries > 1000)
			return -1;
		usleep(5000); /* the backlog is full: wait our turn */
	}
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	return s;
}

static struct tally client(const char *path, int fd, double seconds, int go)
{
	struct tally t = {0};
	static unsigned char frame[12 + sizeof BODY - 1], answer[MAX_FRAME + 1];
	char cbuf[CMSG_SPACE(sizeof(int))];
	char dummy;
	int s = dial(path);
	if (s < 0) {
		perror("loadgen: connect");
		t.errors = 1;
		return t;
	}
	if (read(go, &dummy, 1) < 0) /* EOF when the parent has started everyone */
		return t;
	memcpy(frame, "BT\x01\x01", 4); /* magic, version 1, kind 1 (request) */
	put32(frame + 8, sizeof BODY - 1);
	memcpy(frame + 12, BODY, sizeof BODY - 1);
	double end = now() + seconds;
	for (uint32_t id = 1; now() < end; id++) {
		struct iovec iov = {.iov_base = frame, .iov_len = sizeof frame};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
		put32(frame + 4, id);
		if (sendmsg(s, &mh, 0) < 0) {
			t.timeouts += errno == EAGAIN;
			t.errors += errno != EAGAIN;
			break;
		}
		t.queries++;
		for (;;) { /* skip notifications (kind 3) and stale answers: ours carries our id */
			ssize_t n = recv(s, answer, sizeof answer, 0);
			if (n < 0 && errno == EAGAIN) {
				t.timeouts++;
				goto out;
			}
			if (n < 12 || memcmp(answer, "BT\x01", 3) != 0 || get32(answer + 8) != (uint32_t)n - 12) {
				t.errors++;
				goto out;
			}
			if (answer[3] == 2 && get32(answer + 4) == id) {
				if (n >= 22 && memcmp(answer + 12, "{\"ok\":true", 10) == 0)
					t.ok++;
				else
					t.errors++;
				break;
			}
		}
	}
out:
	close(s);
	return t;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s SOCKET_PATH FD CLIENTS SECONDS\n", argv[0]);
		return 2;
	}
	const char *path = argv[1];
	int fd = atoi(argv[2]), clients = atoi(argv[3]);
	double seconds = atof(argv[4]);
	int go[2], results[2];
	if (clients < 1 || pipe(go) < 0 || pipe(results) < 0)
		return 2;
	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < clients; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("loadgen: fork");
			return 1;
		}
		if (pid == 0) {
			close(go[1]);
			close(results[0]);
			struct tally t = client(path, fd, seconds, go[0]);
			if (write(results[1], &t, sizeof t) != sizeof t)
				_exit(1);
			_exit(0);
		}
	}
	close(go[0]);
	close(results[1]);
	usleep(200000); /* let every client connect before the start */
	close(go[1]);
	struct tally sum = {0}, t;
	while (read(results[0], &t, sizeof t) == sizeof t) {
		sum.queries += t.queries;
		sum.ok += t.ok;
		sum.errors += t.errors;
		sum.timeouts += t.timeouts;
	}
	while (wait(NULL) > 0)
		;
	printf("queries=%llu ok=%llu errors=%llu timeouts=%llu clients=%d seconds=%g qps=%.0f\n",
	       (unsigned long long)sum.queries, (unsigned long long)sum.ok, (unsigned long long)sum.errors,
	       (unsigned long long)sum.timeouts, clients, seconds, sum.queries / seconds);
	return sum.errors || sum.timeouts ? 1 : 0;
}
