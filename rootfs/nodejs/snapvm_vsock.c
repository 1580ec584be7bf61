/*
 * snapvm_vsock.node: the few system calls the node agent needs and node
 * cannot make.
 *
 * Node has no AF_VSOCK: net.Socket only wraps what libuv's
 * uv_guess_handle() recognises (TCP, Unix, UDP, pipes), and a child process
 * cannot hand a connected socket to node, which has no way to receive a
 * file descriptor (SCM_RIGHTS). So this addon connects the socket in node's
 * own process and returns the file descriptor; the agent reads and writes
 * it with fs.read/fs.write. Reconnecting after the host drops the
 * connection (a snapshot restore resets every vsock connection) is then
 * one call, with no process to spawn on the restore path. The same goes
 * for the init frame: RNDADDENTROPY and clock_settime happen in-process.
 *
 *   connectVsock(cid, port) -> fd      AF_VSOCK stream, blocking
 *   connectUnix(path)       -> fd      AF_UNIX stream (the tests' stand-in)
 *   seedRng(buffer)                    RNDADDENTROPY + RNDRESEEDCRNG
 *   setRealtime(sec, nsec)             clock_settime(CLOCK_REALTIME)
 *
 * Errors are thrown as Error objects whose code is the errno name
 * ("ECONNREFUSED"). Only N-API version 3 is used, so the addon loads in
 * any node from 10 on. Test mode (SNAPVM_GUEST_FAKE) as in guestops.h.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 3
#include <node_api.h>

#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "guestops.h"

#define CHECK(env, call)                                                   \
    do {                                                                   \
        if ((call) != napi_ok) {                                           \
            napi_throw_error((env), "EINVAL", "snapvm_vsock: " #call " failed"); \
            return NULL;                                                   \
        }                                                                  \
    } while (0)

static napi_value throw_errno(napi_env env, int e, const char *what)
{
    char msg[256];
    const char *name = strerrorname_np(e);

    snprintf(msg, sizeof msg, "%s: %s", what, strerror(e));
    napi_throw_error(env, name ? name : "EIO", msg);
    return NULL;
}

static napi_value throw_msg(napi_env env, const char *msg)
{
    napi_throw_error(env, "EINVAL", msg);
    return NULL;
}

static napi_value make_int(napi_env env, int v)
{
    napi_value out;
    if (napi_create_int32(env, v, &out) != napi_ok)
        return NULL;
    return out;
}

static napi_value undefined(napi_env env)
{
    napi_value out;
    if (napi_get_undefined(env, &out) != napi_ok)
        return NULL;
    return out;
}

/* Gets exactly n arguments. */
static int get_args(napi_env env, napi_callback_info info, size_t n, napi_value *args)
{
    size_t argc = n;
    if (napi_get_cb_info(env, info, &argc, args, NULL, NULL) != napi_ok || argc != n) {
        napi_throw_type_error(env, "EINVAL", "snapvm_vsock: wrong number of arguments");
        return -1;
    }
    return 0;
}

static int get_u32(napi_env env, napi_value v, uint32_t *out)
{
    double d;
    if (napi_get_value_double(env, v, &d) != napi_ok || d < 0 || d > 4294967295.0 ||
        d != (double)(uint32_t)d) {
        napi_throw_type_error(env, "EINVAL", "snapvm_vsock: expected an integer 0..2^32-1");
        return -1;
    }
    *out = (uint32_t)d;
    return 0;
}

static napi_value connect_fd(napi_env env, int family, const struct sockaddr *addr,
                             socklen_t len, const char *what)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return throw_errno(env, errno, what);
    if (connect(fd, addr, len) != 0) {
        int e = errno;
        close(fd);
        return throw_errno(env, e, what);
    }
    return make_int(env, fd);
}

static napi_value connect_vsock(napi_env env, napi_callback_info info)
{
    napi_value args[2];
    struct sockaddr_vm addr;
    uint32_t cid, port;

    if (get_args(env, info, 2, args) || get_u32(env, args[0], &cid) ||
        get_u32(env, args[1], &port))
        return NULL;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    return connect_fd(env, AF_VSOCK, (struct sockaddr *)&addr, sizeof addr, "vsock connect");
}

static napi_value connect_unix(napi_env env, napi_callback_info info)
{
    napi_value args[1];
    struct sockaddr_un addr;
    size_t len;

    if (get_args(env, info, 1, args))
        return NULL;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (napi_get_value_string_utf8(env, args[0], addr.sun_path, sizeof addr.sun_path, &len) !=
            napi_ok ||
        len == 0 || len >= sizeof addr.sun_path - 1)
        return throw_msg(env, "snapvm_vsock: connectUnix needs a socket path");
    return connect_fd(env, AF_UNIX, (struct sockaddr *)&addr, sizeof addr, "unix connect");
}

static napi_value seed_rng(napi_env env, napi_callback_info info)
{
    napi_value args[1];
    void *data;
    size_t len;
    bool is_buffer;
    char err[256];

    if (get_args(env, info, 1, args))
        return NULL;
    CHECK(env, napi_is_buffer(env, args[0], &is_buffer));
    if (!is_buffer)
        return throw_msg(env, "snapvm_vsock: seedRng needs a Buffer");
    CHECK(env, napi_get_buffer_info(env, args[0], &data, &len));
    if (guest_seed_rng(data, len, err, sizeof err) != 0)
        return throw_msg(env, err);
    return undefined(env);
}

static napi_value set_realtime(napi_env env, napi_callback_info info)
{
    napi_value args[2];
    double sec;
    uint32_t nsec;
    char err[256];

    if (get_args(env, info, 2, args))
        return NULL;
    CHECK(env, napi_get_value_double(env, args[0], &sec));
    if (sec < 0 || sec > 9007199254740991.0 || sec != (double)(uint64_t)sec)
        return throw_msg(env, "snapvm_vsock: setRealtime: bad seconds");
    if (get_u32(env, args[1], &nsec))
        return NULL;
    if (guest_set_realtime((uint64_t)sec, nsec, err, sizeof err) != 0)
        return throw_msg(env, err);
    return undefined(env);
}

static napi_value init(napi_env env, napi_value exports)
{
    static const struct {
        const char *name;
        napi_callback cb;
    } fns[] = {
        {"connectVsock", connect_vsock},
        {"connectUnix", connect_unix},
        {"seedRng", seed_rng},
        {"setRealtime", set_realtime},
    };
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        napi_value fn;
        CHECK(env, napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].cb, NULL, &fn));
        CHECK(env, napi_set_named_property(env, exports, fns[i].name, fn));
    }
    return exports;
}

NAPI_MODULE(snapvm_vsock, init)
