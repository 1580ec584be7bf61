/*
 * snapvm-guest: the native side of a snapvm root image, one static binary.
 *
 *   as PID 1 (/sbin/init is a link to it), or "snapvm-guest init":
 *       mount /proc, /sys, /dev (devtmpfs), /dev/shm and /tmp (tmpfs),
 *       report boot done on the control port (123), start the agent as
 *       /etc/snapvm/agent.argv and agent.env say, reap orphans, and restart
 *       the machine when the agent dies (reboot=k: the VMM exits), since
 *       PID 1 must never exit.
 *   snapvm-guest outb BYTE        write BYTE (0..255) to the control port
 *   snapvm-guest mount-ro DEV DIR mount DEV on DIR read-only (the appfs)
 *
 * The agents run it for the control port (written through /dev/port, so
 * from CPL0: see guestops.c) and the mount, which Python's and node's
 * standard libraries cannot do. Test mode (SNAPVM_GUEST_FAKE=FILE): see guestops.h; init
 * then also reads its configuration from $SNAPVM_INIT_CONF and exits
 * instead of restarting the machine.
 */
#define _GNU_SOURCE
#include "guestops.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CONF_DIR "/etc/snapvm"
#define MAX_ARGS 64
#define MAX_LINE 4096

static int usage(FILE *to)
{
    fputs("usage: snapvm-guest outb BYTE        write BYTE (0..255) to port 0x3f0\n"
          "       snapvm-guest mount-ro DEV DIR mount DEV read-only on DIR\n"
          "       snapvm-guest init             be the root image's init (PID 1)\n"
          "test mode: " GUEST_FAKE_ENV "=FILE logs each privileged operation to FILE\n"
          "instead of performing it\n",
          to);
    return to == stdout ? 0 : 2;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
    char line[MAX_LINE];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "snapvm-init: %s\n", line);
}

/* Reads FILE's non-empty, non-comment lines into lines[] (malloc'd). */
static int read_lines(const char *path, char **lines, int max)
{
    char buf[MAX_LINE];
    int n = 0;
    FILE *f = fopen(path, "re");

    if (!f)
        return -1;
    while (fgets(buf, sizeof buf, f)) {
        size_t len = strcspn(buf, "\n");
        buf[len] = 0;
        if (len == 0 || buf[0] == '#')
            continue;
        if (n == max) {
            say("%s: more than %d lines, the rest is ignored", path, max);
            break;
        }
        lines[n] = strdup(buf);
        if (!lines[n])
            break;
        n++;
    }
    fclose(f);
    lines[n] = NULL;
    return n;
}

static void init_mount(const char *src, const char *dir, const char *type,
                       unsigned long flags, const char *data)
{
    char err[256];

    if (guest_fake_path()) {
        guest_fake_log(err, sizeof err, "mount %s %s %s", src, dir, type);
        return;
    }
    mkdir(dir, 0755);
    /* EBUSY: already there (CONFIG_DEVTMPFS_MOUNT mounts /dev early). */
    if (mount(src, dir, type, flags, data) != 0 && errno != EBUSY)
        say("cannot mount %s: %s", dir, strerror(errno));
}

/* Never returns: PID 1 exiting panics the kernel, so the machine is
 * restarted instead (with reboot=k the VMM sees the reset and exits). */
static void restart_machine(int status)
{
    char err[256];

    if (guest_fake_path()) {
        guest_fake_log(err, sizeof err, "reboot");
        exit(status);
    }
    sync();
    reboot(RB_AUTOBOOT);
    say("reboot failed: %s", strerror(errno));
    for (;;)
        pause();
}

static int run_init(void)
{
    char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 1];
    char argv_path[512], env_path[512], err[256];
    const char *conf = CONF_DIR;
    pid_t agent, pid;
    int status, fd;

    if (guest_fake_path() && getenv("SNAPVM_INIT_CONF"))
        conf = getenv("SNAPVM_INIT_CONF");

    init_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    init_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    init_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    /* POSIX semaphores and shared memory (Python's multiprocessing). */
    init_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    init_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    if (!guest_fake_path()) {
        /* Without /dev/console in the image the kernel could not give us
         * stdio; now devtmpfs has it. */
        fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
    }
    if (guest_control(CONTROL_BOOT_DONE, err, sizeof err) != 0)
        say("boot done: %s", err);

    snprintf(argv_path, sizeof argv_path, "%s/agent.argv", conf);
    snprintf(env_path, sizeof env_path, "%s/agent.env", conf);
    if (read_lines(argv_path, argv, MAX_ARGS) <= 0) {
        say("%s: missing or empty: no agent to run", argv_path);
        restart_machine(1);
    }
    if (read_lines(env_path, envp, MAX_ARGS) < 0)
        envp[0] = NULL;

    agent = fork();
    if (agent < 0) {
        say("fork: %s", strerror(errno));
        restart_machine(1);
    }
    if (agent == 0) {
        setsid();
        execve(argv[0], argv, envp);
        say("cannot run the agent %s: %s", argv[0], strerror(errno));
        _exit(127);
    }
    /* Reap everything; orphans of the function's children land here. */
    for (;;) {
        pid = wait(&status);
        if (pid == agent)
            break;
        if (pid < 0 && errno == ECHILD) {
            status = 0;
            break;
        }
    }
    if (WIFEXITED(status)) {
        say("the agent exited with status %d; restarting the machine", WEXITSTATUS(status));
    } else if (WIFSIGNALED(status)) {
        say("the agent was killed by signal %d (%s); restarting the machine",
            WTERMSIG(status), strsignal(WTERMSIG(status)));
    }
    restart_machine(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 1;
}

/* Parses a decimal byte. */
static int parse_byte(const char *s, unsigned *out)
{
    char *end;
    unsigned long v;

    if (!*s || strspn(s, "0123456789") != strlen(s))
        return -1;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v > 255)
        return -1;
    *out = (unsigned)v;
    return 0;
}

int main(int argc, char **argv)
{
    char err[512];
    unsigned byte;
    const char *name = argc > 0 ? basename(argv[0]) : "snapvm-guest";

    if (getpid() == 1 || strcmp(name, "init") == 0)
        return run_init();
    if (argc < 2)
        return usage(stderr);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))
        return usage(stdout);
    if (!strcmp(argv[1], "init") && argc == 2)
        return run_init();
    if (!strcmp(argv[1], "outb") && argc == 3) {
        if (parse_byte(argv[2], &byte) != 0) {
            fprintf(stderr, "snapvm-guest: outb: '%s' is not a byte (0..255)\n", argv[2]);
            return 2;
        }
        if (guest_control(byte, err, sizeof err) != 0) {
            fprintf(stderr, "snapvm-guest: outb %u: %s\n", byte, err);
            return 1;
        }
        return 0;
    }
    if (!strcmp(argv[1], "mount-ro") && argc == 4) {
        if (guest_mount_ro(argv[2], argv[3], err, sizeof err) != 0) {
            fprintf(stderr, "snapvm-guest: %s\n", err);
            return 1;
        }
        return 0;
    }
    return usage(stderr);
}
