/* See guestops.h. */
#define _GNU_SOURCE
#include "guestops.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Longest seed guest_seed_rng accepts (the init frame carries 32 bytes). */
#define MAX_SEED 256

const char *guest_fake_path(void)
{
    const char *p = getenv(GUEST_FAKE_ENV);
    return (p && *p) ? p : NULL;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (errlen)
        vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

int guest_fake_log(char *err, size_t errlen, const char *fmt, ...)
{
    const char *path = guest_fake_path();
    char line[1024];
    va_list ap;
    int n, fd;

    if (!path)
        return fail(err, errlen, "%s is not set", GUEST_FAKE_ENV);
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line - 1)
        return fail(err, errlen, "test log line too long");
    line[n++] = '\n';
    /* One write() per line on an O_APPEND file keeps lines from several
     * processes whole and in order. */
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail(err, errlen, "%s: %s", path, strerror(errno));
    if (write(fd, line, (size_t)n) != n) {
        int e = errno;
        close(fd);
        return fail(err, errlen, "%s: %s", path, strerror(e));
    }
    close(fd);
    return 0;
}

int guest_control(unsigned value, char *err, size_t errlen)
{
    if (value > 255)
        return fail(err, errlen, "control byte %u is not a byte", value);
    if (guest_fake_path())
        return guest_fake_log(err, errlen, "outb 0x%x %u", CONTROL_PORT, value);
    /* Through /dev/port: the kernel executes the `outb` at CPL0, so the
     * write does not depend on the TSS I/O bitmap, whose check some CPUs
     * (QEMU TCG) fail after a snapshot restore has left TR busy. */
    unsigned char byte = (unsigned char)value;
    int fd = open("/dev/port", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "/dev/port: %s (the guest kernel needs CONFIG_DEVPORT)",
                    strerror(errno));
    ssize_t n = pwrite(fd, &byte, 1, CONTROL_PORT);
    int e = errno;
    close(fd);
    if (n != 1)
        return fail(err, errlen, "/dev/port at 0x%x: %s", CONTROL_PORT,
                    n < 0 ? strerror(e) : "short write");
    return 0;
}

int guest_mount_ro(const char *dev, const char *dir, char *err, size_t errlen)
{
    struct stat st;

    if (guest_fake_path()) {
        /* Fail where a real mount would fail for want of the mount point,
         * so tests can take the app-load-failure path. */
        if (stat(dir, &st) != 0)
            return fail(err, errlen, "cannot mount %s read-only on %s: %s", dev, dir,
                        strerror(errno));
        if (!S_ISDIR(st.st_mode))
            return fail(err, errlen, "cannot mount %s read-only on %s: %s", dev, dir,
                        strerror(ENOTDIR));
        return guest_fake_log(err, errlen, "mount %s %s ro", dev, dir);
    }
    /* The kernel has ext4 only, which mounts ext2 (appfs) images too; try
     * "ext2" as well for kernels that have the ext2 driver instead. */
    if (mount(dev, dir, "ext4", MS_RDONLY | MS_NODEV | MS_NOSUID, NULL) == 0)
        return 0;
    int e = errno;
    if (mount(dev, dir, "ext2", MS_RDONLY | MS_NODEV | MS_NOSUID, NULL) == 0)
        return 0;
    return fail(err, errlen, "cannot mount %s read-only on %s: %s%s", dev, dir,
                strerror(e),
                e == EINVAL ? " (no ext2/ext4 file system on it: empty appfs?)" : "");
}

static void hex(const unsigned char *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = 0;
}

int guest_seed_rng(const unsigned char *seed, size_t len, char *err, size_t errlen)
{
    struct {
        struct rand_pool_info info;
        unsigned char bytes[MAX_SEED];
    } req;
    int fd;

    if (len == 0 || len > MAX_SEED)
        return fail(err, errlen, "seed of %zu bytes (want 1..%d)", len, MAX_SEED);
    req.info.entropy_count = (int)(8 * len);
    req.info.buf_size = (int)len;
    memcpy(req.info.buf, seed, len);

    if (guest_fake_path()) {
        /* Log what the kernel would read: the request as built. */
        char h[2 * MAX_SEED + 1];
        hex((const unsigned char *)req.info.buf, (size_t)req.info.buf_size, h);
        if (guest_fake_log(err, errlen,
                           "ioctl /dev/random RNDADDENTROPY 0x%lx entropy_count=%d buf_size=%d buf=%s",
                           (unsigned long)RNDADDENTROPY, req.info.entropy_count,
                           req.info.buf_size, h))
            return -1;
        return guest_fake_log(err, errlen, "ioctl /dev/random RNDRESEEDCRNG 0x%lx",
                              (unsigned long)RNDRESEEDCRNG);
    }
    fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "/dev/random: %s", strerror(errno));
    if (ioctl(fd, RNDADDENTROPY, &req.info) != 0) {
        int e = errno;
        close(fd);
        return fail(err, errlen, "RNDADDENTROPY: %s", strerror(e));
    }
    /* ENODATA: the CRNG is not ready yet, so it has not been handing out
     * anything a clone could share. EINVAL: a kernel before 4.17. */
    if (ioctl(fd, RNDRESEEDCRNG) != 0 && errno != ENODATA && errno != EINVAL) {
        int e = errno;
        close(fd);
        return fail(err, errlen, "RNDRESEEDCRNG: %s", strerror(e));
    }
    close(fd);
    return 0;
}

int guest_set_realtime(uint64_t sec, uint32_t nsec, char *err, size_t errlen)
{
    struct timespec ts;

    if (nsec >= 1000000000u)
        return fail(err, errlen, "nanoseconds %u out of range", nsec);
    if (guest_fake_path())
        return guest_fake_log(err, errlen, "clock_settime CLOCK_REALTIME %llu.%09u",
                              (unsigned long long)sec, nsec);
    ts.tv_sec = (time_t)sec;
    ts.tv_nsec = (long)nsec;
    if (clock_settime(CLOCK_REALTIME, &ts) != 0)
        return fail(err, errlen, "clock_settime: %s", strerror(errno));
    return 0;
}
