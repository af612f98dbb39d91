/* ecsnap-bench-io: the guest side of benchmarks 4 and 6 (bench/guest.py).
 *
 * Built on the host with `gcc -O2 -static` and copied into the demo guest through the
 * guest agent, so it needs nothing from the guest but the kernel. One process, no
 * process per write (a busybox shell loop forks per write, far too slow under TCG).
 *
 *   ecsnap-bench-io stall FILE SECONDS TTY OUT
 *       4 KiB O_DIRECT writes, one after the other, cycling over the first 4 MiB of
 *       FILE (created), for SECONDS of guest time. After each write completes, one byte
 *       '|' goes to TTY (the serial console, which the host reads with host timestamps;
 *       a newline every 64 writes). At the end "\nEND <writes>\n" goes to TTY and the
 *       guest CLOCK_MONOTONIC time of every write completion (microseconds since the
 *       start, one per line) to OUT.
 *   ecsnap-bench-io seq DEV OFFSET LENGTH
 *       1 MiB O_DIRECT writes over [OFFSET, OFFSET+LENGTH) of DEV, then fdatasync;
 *       prints "seq bytes=<n> seconds=<s>" (guest clock, the flush included).
 *   ecsnap-bench-io rand DEV OFFSET LENGTH SECONDS SEED
 *       4 KiB O_DIRECT writes at random 4 KiB-aligned offsets of [OFFSET, OFFSET+LENGTH)
 *       (the same sequence for the same SEED), queue depth 1, for SECONDS, then
 *       fdatasync; prints "rand ops=<n> seconds=<s>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MIB (1024 * 1024)
#define STALL_REGION (4 * MIB)
#define MAX_STAMPS (4 * 1024 * 1024)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "ecsnap-bench-io: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void *aligned(size_t size, unsigned char fill) {
    void *buf;
    if (posix_memalign(&buf, BLOCK, size) != 0)
        die("posix_memalign");
    memset(buf, fill, size);
    return buf;
}

static void write_all(int fd, const void *buf, size_t len, off_t off) {
    ssize_t n = pwrite(fd, buf, len, off);
    if (n != (ssize_t)len)
        die("pwrite");
}

static int stall(const char *file, double seconds, const char *tty, const char *out) {
    int fd = open(file, O_WRONLY | O_CREAT | O_DIRECT, 0644);
    if (fd < 0)
        die(file);
    int con = open(tty, O_WRONLY | O_NOCTTY);
    if (con < 0)
        die(tty);
    uint32_t *stamps = malloc(sizeof(uint32_t) * MAX_STAMPS);
    if (!stamps)
        die("malloc");
    unsigned char *buf = aligned(BLOCK, 0x5a);
    long n = 0;
    double start = now(), t;
    do {
        buf[0] = (unsigned char)n;
        write_all(fd, buf, BLOCK, (off_t)(n % (STALL_REGION / BLOCK)) * BLOCK);
        t = now();
        if (n < MAX_STAMPS)
            stamps[n] = (uint32_t)((t - start) * 1e6);
        n++;
        if (write(con, (n % 64) ? "|" : "|\n", (n % 64) ? 1 : 2) < 0)
            die("write tty");
    } while (t - start < seconds);
    char end[64];
    int len = snprintf(end, sizeof end, "\nEND %ld\n", n);
    if (write(con, end, len) < 0)
        die("write tty");
    FILE *f = fopen(out, "w");
    if (!f)
        die(out);
    for (long i = 0; i < n && i < MAX_STAMPS; i++)
        fprintf(f, "%u\n", stamps[i]);
    fclose(f);
    close(fd);
    return 0;
}

static int seq(const char *dev, long long offset, long long length) {
    int fd = open(dev, O_WRONLY | O_DIRECT);
    if (fd < 0)
        die(dev);
    unsigned char *buf = aligned(MIB, 0xa5);
    double start = now();
    long long done = 0;
    while (done < length) {
        size_t chunk = length - done < MIB ? (size_t)(length - done) : MIB;
        buf[0] = (unsigned char)(done / MIB);
        write_all(fd, buf, chunk, offset + done);
        done += chunk;
    }
    if (fdatasync(fd) != 0)
        die("fdatasync");
    printf("seq bytes=%lld seconds=%.6f\n", done, now() - start);
    close(fd);
    return 0;
}

static int rnd(const char *dev, long long offset, long long length, double seconds,
               uint64_t seed) {
    int fd = open(dev, O_WRONLY | O_DIRECT);
    if (fd < 0)
        die(dev);
    unsigned char *buf = aligned(BLOCK, 0x3c);
    uint64_t x = seed ? seed : 88172645463325252ULL;
    long long blocks = length / BLOCK;
    long ops = 0;
    double start = now();
    while (now() - start < seconds) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;  /* xorshift64 */
        buf[0] = (unsigned char)ops;
        write_all(fd, buf, BLOCK, offset + (long long)(x % (uint64_t)blocks) * BLOCK);
        ops++;
    }
    if (fdatasync(fd) != 0)
        die("fdatasync");
    printf("rand ops=%ld seconds=%.6f\n", ops, now() - start);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "stall"))
        return stall(argv[2], atof(argv[3]), argv[4], argv[5]);
    if (argc == 5 && !strcmp(argv[1], "seq"))
        return seq(argv[2], atoll(argv[3]), atoll(argv[4]));
    if (argc == 7 && !strcmp(argv[1], "rand"))
        return rnd(argv[2], atoll(argv[3]), atoll(argv[4]), atof(argv[5]),
                   strtoull(argv[6], NULL, 10));
    fprintf(stderr, "usage: ecsnap-bench-io stall FILE SECONDS TTY OUT | seq DEV OFFSET "
                    "LENGTH | rand DEV OFFSET LENGTH SECONDS SEED\n");
    return 2;
}
