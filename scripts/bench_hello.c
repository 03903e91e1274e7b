/* bench_hello: new connections per second, each opening with a TLS ClientHello.
 *
 * Part of `make bench` (scripts/bench_sni.py): a load generator light enough
 * that the proxy, not the client, limits the rate, and a backend that plays a
 * TLS server's part without its crypto, so what is measured is the proxy's
 * work per connection (accept, peek the hello, pick the app by SNI, connect,
 * relay, close), not TLS handshakes.
 *
 *   bench_hello server PORT:NAME ...
 *       On each port: read one whole TLS record (the hello), answer "NAME\n",
 *       close (the server closes first, as nginx after `Connection: close`).
 *   bench_hello client SECONDS CONCURRENCY PORT:FILE:REPLY ...
 *       Keep CONCURRENCY connections going for SECONDS, each to the next
 *       target in turn: connect to 127.0.0.1:PORT, send FILE's bytes in one
 *       write, read to the end, count it if the answer starts with REPLY.
 *       Prints "connections N errors E seconds S".
 *
 * One thread each, epoll, non-blocking sockets; no allocation per connection.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536      /* per-descriptor state is indexed by descriptor */
#define MAX_TARGETS 16     /* PORT:FILE:REPLY arguments */
#define MAX_HELLO 20000    /* bytes of a canned hello (a TLS record: 5 + 16 KiB at most) */
#define REPLY_BYTES 32     /* bytes of an answer kept to compare */
#define EVENTS 256         /* epoll events taken per wait */
#define BACKLOG 4096

static void die(const char *what) {
    perror(what);
    exit(2);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

/* --- server ------------------------------------------------------------------ */

struct served {
    int name;   /* index into names: which port accepted it */
    int got;    /* bytes of the record read so far */
    int need;   /* its whole size, once its header is in; 0 before */
    unsigned char head[5];
};

static int serve(int argc, char **argv) {
    static struct served conns[MAX_FDS];
    static char names[MAX_TARGETS][64];
    int listeners[MAX_TARGETS], count = argc;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    if (count > MAX_TARGETS) count = MAX_TARGETS;
    for (int i = 0; i < count; i++) {
        int port = atoi(argv[i]);
        const char *colon = strchr(argv[i], ':');
        snprintf(names[i], sizeof names[i], "%s\n", colon ? colon + 1 : "?");
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
        struct sockaddr_in addr = loopback(port);
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, BACKLOG)) die("listen");
        listeners[i] = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (1ULL << 32) | i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    struct epoll_event events[EVENTS];
    unsigned char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, events, EVENTS, -1);
        for (int e = 0; e < n; e++) {
            unsigned long long data = events[e].data.u64;
            if (data >> 32) { /* a listener: take every waiting connection */
                int which = (int)(data & 0xffffffff), fd;
                while ((fd = accept4(listeners[which], NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (fd >= MAX_FDS) { close(fd); continue; }
                    conns[fd] = (struct served){.name = which};
                    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (unsigned)fd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int fd = (int)data;
            struct served *c = &conns[fd];
            int done = 0;
            for (;;) {
                ssize_t got = read(fd, buf, sizeof buf);
                if (got <= 0) {
                    if (got < 0 && errno == EAGAIN) break;
                    done = -1; /* closed or failed before a whole hello: no answer */
                    break;
                }
                ssize_t i = 0;
                while (i < got && c->got < 5) c->head[c->got++] = buf[i++];
                c->got += (int)(got - i);
                if (!c->need && c->got >= 5) c->need = 5 + (c->head[3] << 8 | c->head[4]);
                if (c->need && c->got >= c->need) { done = 1; break; }
            }
            if (done > 0) {
                size_t len = strlen(names[c->name]);
                if (write(fd, names[c->name], len) != (ssize_t)len) { /* the client is gone */ }
            }
            if (done) close(fd);
        }
    }
    return 0;
}

/* --- client ------------------------------------------------------------------ */

struct target {
    struct sockaddr_in addr;
    unsigned char hello[MAX_HELLO];
    int size;
    char reply[REPLY_BYTES];
    int reply_size;
};

struct conn {
    int target;  /* index into targets; -1: slot free */
    int sent;    /* the hello is written */
    int got;     /* bytes of the answer kept */
    char answer[REPLY_BYTES];
};

static struct target targets[MAX_TARGETS];
static struct conn conns[MAX_FDS];
static long completed, errors;
static int next_target, target_count;

static void start(int ep) {
    int which = next_target;
    next_target = (next_target + 1) % target_count;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    if (fd >= MAX_FDS) die("descriptor out of range");
    conns[fd] = (struct conn){.target = which};
    if (connect(fd, (struct sockaddr *)&targets[which].addr, sizeof targets[which].addr) &&
        errno != EINPROGRESS)
        die("connect");
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void finish(int ep, int fd, int ok) {
    if (ok) completed++;
    else errors++;
    close(fd); /* closing removes it from the epoll set */
    conns[fd].target = -1;
    start(ep);
}

static int run_client(int argc, char **argv) {
    double seconds = atof(argv[0]);
    int concurrency = atoi(argv[1]);
    argc -= 2, argv += 2;
    target_count = argc < MAX_TARGETS ? argc : MAX_TARGETS;
    for (int i = 0; i < target_count; i++) {
        char *spec = argv[i], *file = strchr(spec, ':'), *reply = file ? strchr(file + 1, ':') : 0;
        if (!reply) { fprintf(stderr, "bad target %s (PORT:FILE:REPLY)\n", spec); return 2; }
        *file++ = 0, *reply++ = 0;
        struct target *t = &targets[i];
        t->addr = loopback(atoi(spec));
        FILE *f = fopen(file, "rb");
        if (!f) die(file);
        t->size = (int)fread(t->hello, 1, sizeof t->hello, f);
        fclose(f);
        t->reply_size = snprintf(t->reply, sizeof t->reply, "%s\n", reply);
    }
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < concurrency; i++) start(ep);
    struct epoll_event events[EVENTS];
    char buf[4096];
    double started = now(), end = started + seconds;
    while (now() < end) {
        int n = epoll_wait(ep, events, EVENTS, 100);
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            struct conn *c = &conns[fd];
            struct target *t = &targets[c->target];
            if (!c->sent) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(fd, t->hello, t->size) != t->size) { finish(ep, fd, 0); continue; }
                c->sent = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                continue;
            }
            for (;;) {
                ssize_t got = read(fd, buf, sizeof buf);
                if (got < 0 && errno == EAGAIN) break;
                if (got <= 0) { /* the end: counted if the right backend answered */
                    finish(ep, fd, got == 0 && c->got >= t->reply_size &&
                                       !memcmp(c->answer, t->reply, t->reply_size));
                    break;
                }
                for (ssize_t i = 0; i < got && c->got < REPLY_BYTES; i++) c->answer[c->got++] = buf[i];
            }
        }
    }
    printf("connections %ld errors %ld seconds %.3f\n", completed, errors, now() - started);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "server")) return serve(argc - 2, argv + 2);
    if (argc >= 5 && !strcmp(argv[1], "client")) return run_client(argc - 2, argv + 2);
    fprintf(stderr, "usage: %s server PORT:NAME ... | client SECONDS CONCURRENCY PORT:FILE:REPLY ...\n",
            argv[0]);
    return 2;
}
