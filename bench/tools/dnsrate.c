// DNS load generator and responder for the domain-name benchmark.
//
//   dnsrate serve PORT ADDRESS
//       answer every A query on UDP PORT (IPv4) with one A record ADDRESS, TTL 300;
//       native, so the responder is never what limits the rate being measured
//   dnsrate client SERVER PORT SECONDS INFLIGHT NAME
//       keep INFLIGHT queries for NAME outstanding for SECONDS (a query unanswered for
//       1 s counts as a timeout and is replaced); prints
//       "lookups N seconds S rate R p50_us A p99_us B timeouts T"
//
// Single-threaded, epoll-free (one socket, poll), so one pinned core drives it.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(int port, const char *address) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct in_addr answer;
    if (inet_pton(AF_INET, address, &answer) != 1 || bind(fd, (struct sockaddr *)&a, sizeof(a))) {
        perror("dnsrate serve");
        return 1;
    }
    unsigned char buf[1500];
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(fd, buf, sizeof(buf) - 16, 0, (struct sockaddr *)&from, &fl);
        if (n < 12)
            continue;
        // the question ends after the name and 4 bytes of type and class
        ssize_t i = 12;
        while (i < n && buf[i])
            i += buf[i] + 1;
        i += 5;
        if (i > n)
            continue;
        buf[2] = 0x81, buf[3] = 0x80;  // response, RD, RA, NOERROR
        buf[6] = 0, buf[7] = 1;        // one answer
        buf[8] = buf[9] = buf[10] = buf[11] = 0;
        unsigned char rr[16] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4};
        memcpy(rr + 12, &answer, 4);
        memcpy(buf + i, rr, 16);
        sendto(fd, buf, i + 16, 0, (struct sockaddr *)&from, fl);
    }
}

static size_t query(unsigned char *out, uint16_t id, const char *name) {
    size_t n = 0;
    out[n++] = id >> 8, out[n++] = id & 0xff;
    out[n++] = 0x01, out[n++] = 0;  // RD
    out[n++] = 0, out[n++] = 1;     // one question
    memset(out + n, 0, 6), n += 6;
    const char *p = name;
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        out[n++] = (unsigned char)len;
        memcpy(out + n, p, len), n += len;
        p += len + (dot ? 1 : 0);
    }
    out[n++] = 0;
    out[n++] = 0, out[n++] = 1;  // A
    out[n++] = 0, out[n++] = 1;  // IN
    return n;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int client(const char *server, int port, double seconds, int inflight, const char *name) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, server, &a.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&a, sizeof(a))) {
        perror("dnsrate client");
        return 1;
    }
    static double sent[65536];
    static unsigned char out[512], in[1500];
    size_t cap = 1 << 22, count = 0;
    double *lat = malloc(cap * sizeof(double));
    long timeouts = 0;
    uint16_t next = 1;
    int outstanding = 0;
    double start = now(), end = start + seconds, last_scan = start;
    memset(sent, 0, sizeof(sent));
    while (now() < end) {
        while (outstanding < inflight) {
            uint16_t id = next++;
            if (!next)
                next = 1;
            sent[id] = now();
            size_t n = query(out, id, name);
            if (send(fd, out, n, 0) < 0)
                break;
            outstanding++;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 10) > 0) {
            ssize_t n = recv(fd, in, sizeof(in), 0);
            if (n >= 12) {
                uint16_t id = (uint16_t)(in[0] << 8 | in[1]);
                if (sent[id] > 0) {
                    if (count < cap)
                        lat[count] = now() - sent[id];
                    count++;
                    sent[id] = 0;
                    outstanding--;
                }
            }
        }
        double t = now();
        if (t - last_scan > 0.1) {  // expire lost queries, ten times a second
            last_scan = t;
            for (int id = 1; id < 65536; id++) {
                if (sent[id] > 0 && t - sent[id] > 1.0) {
                    sent[id] = 0;
                    outstanding--;
                    timeouts++;
                }
            }
        }
    }
    double took = now() - start;
    size_t k = count < cap ? count : cap;
    qsort(lat, k, sizeof(double), cmp);
    double p50 = k ? lat[k / 2] : 0, p99 = k ? lat[(size_t)(k * 0.99)] : 0;
    printf("lookups %zu seconds %.3f rate %.1f p50_us %.1f p99_us %.1f timeouts %ld\n", count, took,
           count / took, p50 * 1e6, p99 * 1e6, timeouts);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "serve"))
        return serve(atoi(argv[2]), argv[3]);
    if (argc == 7 && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]), argv[6]);
    fprintf(stderr, "usage: dnsrate serve PORT ADDRESS | client SERVER PORT SECONDS INFLIGHT NAME\n");
    return 2;
}
