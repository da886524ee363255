/* A minimal closed-loop HTTP/1.1 load generator: one keep-alive connection, one
 * request at a time, blocking sockets, each request timed with CLOCK_MONOTONIC
 * from its write to the last byte of its answer (Content-Length framed).
 *
 *   closed_loop PORT REQUEST_FILE SECONDS
 *
 * prints "requests N p50 MS p99 MS p999 MS max MS". Built and run by
 * bench/_closed_loop.py: a second opinion next to wrk at concurrency 1. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Content-Length of a response head, or -1. */
static long content_length(const char *head, size_t len) {
    static const char name[] = "\r\ncontent-length:";
    size_t n = sizeof(name) - 1;
    for (size_t i = 0; i + n <= len; i++) {
        if (strncasecmp(head + i, name, n) == 0) return atol(head + i + n);
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT REQUEST_FILE SECONDS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double seconds = atof(argv[3]);
    static char request[1 << 20];
    FILE *f = fopen(argv[2], "rb");
    if (!f) { perror("request file"); return 2; }
    size_t request_len = fread(request, 1, sizeof(request), f);
    fclose(f);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) != 0) { perror("connect"); return 1; }

    size_t cap = 4000000, n = 0;
    double *latency = malloc(cap * sizeof(double));
    static char buf[1 << 20];
    double end = now_s() + seconds;
    while (n < cap && now_s() < end) {
        double t0 = now_s();
        for (size_t sent = 0; sent < request_len;) {
            ssize_t w = write(s, request + sent, request_len - sent);
            if (w <= 0) { perror("write"); return 1; }
            sent += (size_t)w;
        }
        size_t got = 0, head = 0;
        long body = -1;
        for (;;) {
            ssize_t r = read(s, buf + got, sizeof(buf) - got);
            if (r <= 0) { fprintf(stderr, "connection closed after %zu requests\n", n); return 1; }
            got += (size_t)r;
            if (body < 0) {
                char *e = memmem(buf, got, "\r\n\r\n", 4);
                if (e) {
                    head = (size_t)(e - buf) + 4;
                    body = content_length(buf, head);
                    if (body < 0) { fprintf(stderr, "answer without Content-Length\n"); return 1; }
                }
            }
            if (body >= 0 && got >= head + (size_t)body) break;
        }
        latency[n++] = (now_s() - t0) * 1000.0;
    }
    if (n == 0) { fprintf(stderr, "no requests\n"); return 1; }
    qsort(latency, n, sizeof(double), by_value);
    printf("requests %zu p50 %.3f p99 %.3f p999 %.3f max %.3f\n", n, latency[n / 2],
           latency[(size_t)((double)n * 0.99)], latency[(size_t)((double)n * 0.999)], latency[n - 1]);
    return 0;
}
