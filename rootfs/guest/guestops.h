/*
 * The privileged operations of the snapvm guest side, shared by the static
 * helper (snapvm-guest: init, control port, appfs mount) and the nodejs
 * addon (vsock connect, init frame).
 *
 * Test mode: when the environment has SNAPVM_GUEST_FAKE=FILE, no operation
 * touches the machine; each appends one line describing exactly what it
 * would have done to FILE (rootfs/tests read it). The python3 agent writes
 * the same lines for the operations it does itself.
 */
#ifndef SNAPVM_GUESTOPS_H
#define SNAPVM_GUESTOPS_H

#include <stddef.h>
#include <stdint.h>

#define GUEST_FAKE_ENV "SNAPVM_GUEST_FAKE"

/* The control port (DESIGN.md "Guest protocol"). */
#define CONTROL_PORT 0x3f0
#define CONTROL_BOOT_DONE 123
#define CONTROL_SNAPSHOT 124
#define CONTROL_APP_FAILED 125
#define CONTROL_TIMESTAMP 126

/* Every operation returns 0, or -1 with a message in err (errlen bytes). */

/* The test-mode log file, or NULL in a real guest. */
const char *guest_fake_path(void);

/* Appends one formatted line to the test-mode log. */
int guest_fake_log(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes one byte to the control port 0x3f0 through /dev/port. */
int guest_control(unsigned value, char *err, size_t errlen);

/* Mounts DEV on DIR read-only as ext4 (which also reads ext2/ext3). */
int guest_mount_ro(const char *dev, const char *dir, char *err, size_t errlen);

/* Mixes seed into the kernel RNG, credited as 8 bits per byte
 * (RNDADDENTROPY), then reseeds the CRNG at once (RNDRESEEDCRNG) so that
 * clones restored from one snapshot diverge from their next read on. */
int guest_seed_rng(const unsigned char *seed, size_t len, char *err, size_t errlen);

/* Sets CLOCK_REALTIME. */
int guest_set_realtime(uint64_t sec, uint32_t nsec, char *err, size_t errlen);

#endif
