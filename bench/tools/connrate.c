// Connection-rate load generator and sink for the datapath benchmark.
//
//   connrate serve PORT
//       accept connections on PORT (IPv4 and IPv6) and reset each one at once
//       (SO_LINGER 0: no TIME_WAIT to exhaust anything during a long run)
//   connrate client ADDRESS PORT SECONDS CONCURRENCY
//       keep CONCURRENCY connection attempts in flight for SECONDS; a connection counts
//       when its handshake completed and the server's reset (or FIN) came back.
//       Prints: "connections N seconds S rate R failures F"
//
// Single-threaded and epoll-driven, so one pinned core drives it; a Python client
// would be the bottleneck and compress every ratio towards 1.0.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(int port) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    int on = 1, off = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port),
                             .sin6_addr = in6addr_any};
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096)) {
        perror("connrate serve");
        return 1;
    }
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            perror("accept");
            return 1;
        }
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(c);
    }
}

struct target {
    struct sockaddr_storage addr;
    socklen_t len;
    int family;
};

static int start(int ep, const struct target *t) {
    int fd = socket(t->family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    if (connect(fd, (struct sockaddr *)&t->addr, t->len) && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

static int client(const char *address, int port, double seconds, int concurrency) {
    struct target t = {0};
    struct sockaddr_in *v4 = (struct sockaddr_in *)&t.addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t.addr;
    if (inet_pton(AF_INET, address, &v4->sin_addr) == 1) {
        v4->sin_family = t.family = AF_INET;
        v4->sin_port = htons(port);
        t.len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, address, &v6->sin6_addr) == 1) {
        v6->sin6_family = t.family = AF_INET6;
        v6->sin6_port = htons(port);
        t.len = sizeof(*v6);
    } else {
        fprintf(stderr, "connrate: bad address %s\n", address);
        return 2;
    }
    int ep = epoll_create1(0);
    for (int i = 0; i < concurrency; i++) start(ep, &t);
    long done = 0, failures = 0;
    double began = now(), end = began + seconds;
    struct epoll_event evs[256];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            int err = 0;
            socklen_t el = sizeof(err);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            char b;
            ssize_t r = recv(fd, &b, 1, MSG_DONTWAIT);
            // established then reset/closed by the server: a completed connection;
            // refused, unreachable or timed out: a failure
            if ((r == 0 || (r < 0 && errno == ECONNRESET)) && err != ECONNREFUSED &&
                err != ETIMEDOUT && err != EHOSTUNREACH)
                done++;
            else if (r < 0 && errno == EAGAIN && !err)
                continue; // not finished yet
            else
                failures++;
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
            if (start(ep, &t) < 0) failures++;
        }
    }
    double took = now() - began;
    printf("connections %ld seconds %.3f rate %.1f failures %ld\n", done, took, done / took,
           failures);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]));
    if (argc == 6 && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: connrate serve PORT | connrate client ADDRESS PORT SECONDS N\n");
    return 2;
}
