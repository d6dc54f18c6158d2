/*
 * A small load generator for keyagent and, as the yardstick, OpenSSH's ssh-agent.
 *
 * It sends each agent its cheapest useful request over its Unix socket:
 *   keyagent:  {"op":"get"}\n           -> one JSON line back
 *   ssh-agent: SSH_AGENTC_REQUEST_IDENTITIES (message 11) -> IDENTITIES_ANSWER
 *
 * Modes (all print one line of "name=value" pairs; times in nanoseconds):
 *   lat  PROTO SOCK N          N round trips on one persistent connection: p50, p99
 *   conn PROTO SOCK N          N times connect, one request, close: p50, p99
 *   tput PROTO SOCK CONNS SECS CONNS connections, each with one request in flight,
 *                              for SECS seconds: requests per second
 *
 * Build: cc -O2 -o loadgen loadgen.c   (bench/run.py builds it itself)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum proto { KEYAGENT, SSHAGENT };

static const char KEYAGENT_REQ[] = "{\"op\":\"get\"}\n";
static const unsigned char SSH_REQ[] = {0, 0, 0, 1, 11};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int connect_to(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    return fd;
}

static void send_request(int fd, enum proto p) {
    const void *req = p == KEYAGENT ? (const void *)KEYAGENT_REQ : (const void *)SSH_REQ;
    size_t len = p == KEYAGENT ? sizeof KEYAGENT_REQ - 1 : sizeof SSH_REQ;
    if (write(fd, req, len) != (ssize_t)len) die("write");
}

/* Per-connection reply parser state: bytes still expected, or -1 while unknown. */
struct reader {
    unsigned char head[4];
    int head_len;
    long remaining; /* ssh: body bytes left; keyagent: unused */
};

/* Feed bytes; return number of complete replies seen. */
static int feed(struct reader *r, enum proto p, const unsigned char *buf, ssize_t n) {
    int done = 0;
    for (ssize_t i = 0; i < n;) {
        if (p == KEYAGENT) {
            const unsigned char *nl = memchr(buf + i, '\n', (size_t)(n - i));
            if (!nl) break;
            i = (nl - buf) + 1;
            done++;
            continue;
        }
        if (r->head_len < 4) {
            r->head[r->head_len++] = buf[i++];
            if (r->head_len == 4)
                r->remaining = ((long)r->head[0] << 24) | (r->head[1] << 16) |
                               (r->head[2] << 8) | r->head[3];
            continue;
        }
        long take = n - i < r->remaining ? n - i : r->remaining;
        r->remaining -= take;
        i += take;
        if (r->remaining == 0) {
            r->head_len = 0;
            done++;
        }
    }
    return done;
}

static void read_reply(int fd, enum proto p) {
    struct reader r = {0};
    unsigned char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) die("read");
        if (feed(&r, p, buf, n)) return;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *mode, uint64_t *samples, long n) {
    qsort(samples, (size_t)n, sizeof *samples, cmp_u64);
    printf("mode=%s n=%ld p50=%llu p90=%llu p99=%llu\n", mode, n,
           (unsigned long long)samples[n / 2], (unsigned long long)samples[n * 90 / 100],
           (unsigned long long)samples[n * 99 / 100]);
}

static void latency(enum proto p, const char *path, long n) {
    int fd = connect_to(path);
    uint64_t *samples = malloc(sizeof *samples * (size_t)n);
    for (long i = 0; i < n / 10 + 1; i++) { /* warm-up */
        send_request(fd, p);
        read_reply(fd, p);
    }
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        send_request(fd, p);
        read_reply(fd, p);
        samples[i] = now_ns() - t0;
    }
    close(fd);
    report("lat", samples, n);
    free(samples);
}

static void per_connection(enum proto p, const char *path, long n) {
    uint64_t *samples = malloc(sizeof *samples * (size_t)n);
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        int fd = connect_to(path);
        send_request(fd, p);
        read_reply(fd, p);
        close(fd);
        samples[i] = now_ns() - t0;
    }
    report("conn", samples, n);
    free(samples);
}

static void throughput(enum proto p, const char *path, int conns, double seconds) {
    int ep = epoll_create1(0);
    struct reader *readers = calloc((size_t)conns, sizeof *readers);
    int *fds = calloc((size_t)conns, sizeof *fds);
    for (int i = 0; i < conns; i++) {
        fds[i] = connect_to(path);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        send_request(fds[i], p);
    }
    long completed = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    struct epoll_event events[256];
    unsigned char buf[65536];
    while (now_ns() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            ssize_t got = read(fds[i], buf, sizeof buf);
            if (got <= 0) die("read");
            int done = feed(&readers[i], p, buf, got);
            completed += done;
            for (int k = 0; k < done; k++) send_request(fds[i], p);
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("mode=tput conns=%d completed=%ld rps=%.0f\n", conns, completed,
           (double)completed / elapsed);
    for (int i = 0; i < conns; i++) close(fds[i]);
    free(fds);
    free(readers);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s lat|conn PROTO SOCK N | tput PROTO SOCK CONNS SECS\n", argv[0]);
        return 2;
    }
    enum proto p = strcmp(argv[2], "ssh") == 0 ? SSHAGENT : KEYAGENT;
    if (strcmp(argv[1], "lat") == 0) latency(p, argv[3], atol(argv[4]));
    else if (strcmp(argv[1], "conn") == 0) per_connection(p, argv[3], atol(argv[4]));
    else if (strcmp(argv[1], "tput") == 0 && argc >= 6)
        throughput(p, argv[3], atoi(argv[4]), atof(argv[5]));
    else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    return 0;
}
