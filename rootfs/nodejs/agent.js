'use strict';
/*
 * snapvm guest agent for the nodejs runtime.
 *
 * The same sequence as the python3 agent and testguest (DESIGN.md, "Guest
 * protocol"):
 *   1. runtime ready -> control port 124 (language snapshot point);
 *   2. mount the appfs (/dev/vdb) read-only on /srv and load
 *      /srv/workload.js, which exports handle(request) (may return a
 *      Promise); on failure control port 125, and every request is
 *      answered {"error": "app load failed: ..."};
 *   3. control port 124 (diff snapshot point);
 *   4. connect AF_VSOCK to CID 2 port 1234 (retrying 10 ms .. 500 ms apart)
 *      and serve 4-byte big-endian length-framed UTF-8 JSON (at most
 *      4 MiB): the init frame seeds the kernel RNG, sets the clock and is
 *      answered {"ready": true}; every other frame is a request answered
 *      with one JSON object. When the connection drops (a snapshot restore
 *      resets it) the agent reconnects and expects a new init frame.
 *
 * HTTP (multivm's envelope, README "Invocations as OpenFaaS makes them"): a
 * request {"snapvm.http": {method, path, query, headers, body: base64}}
 * goes to handleHttp(req) when workload.js exports it, with req.body a
 * Buffer; it returns (or resolves to) {status (default 200), headers
 * (object of strings), body (Buffer, string, or any JSON value, sent as
 * JSON)}, which becomes the response envelope. handleHttp also takes plain
 * JSON requests (as POST with that JSON as the body). Without it,
 * handle(request) gets the envelope's body parsed as JSON, else as text
 * (null when empty), and answers as always; a body that is not UTF-8 is an
 * error then.
 *
 * Node has no AF_VSOCK, so snapvm_vsock.node (a small N-API addon, see its
 * source) connects the socket and returns the file descriptor, which this
 * agent reads and writes with fs.read/fs.write; it also makes the init
 * frame's system calls. The control port and the mount go through the
 * static helper snapvm-guest, as for python3.
 *
 * Test overrides (environment; unset in the image): SNAPVM_VSOCK
 * (vsock:CID:PORT or unix:PATH), SNAPVM_HELPER, SNAPVM_NODE_ADDON,
 * SNAPVM_APPFS, SNAPVM_APPDIR, SNAPVM_GUEST_FAKE (see guestops.h).
 */

const childProcess = require('child_process');
const fs = require('fs');
const path = require('path');
const url = require('url');
const util = require('util');

const MAX_FRAME = 4 << 20;
const CONTROL_SNAPSHOT = 124;
const CONTROL_APP_FAILED = 125;
const BACKOFF_MIN_MS = 10;
const BACKOFF_MAX_MS = 500;
const CHUNK = 1 << 16;

const env = process.env;
const cfg = {
  helper: env.SNAPVM_HELPER || '/usr/lib/snapvm/snapvm-guest',
  addon: env.SNAPVM_NODE_ADDON || '/usr/lib/snapvm/snapvm_vsock.node',
  vsock: env.SNAPVM_VSOCK || 'vsock:2:1234',
  appfs: env.SNAPVM_APPFS || '/dev/vdb',
  appdir: env.SNAPVM_APPDIR || '/srv',
};
const native = require(cfg.addon);
const fsRead = util.promisify(fs.read);
const fsWrite = util.promisify(fs.write);
const utf8 = new util.TextDecoder('utf-8', { fatal: true });

function log(msg) {
  process.stderr.write(`snapvm-agent: ${msg}\n`);
}

class Closed extends Error {}

function errorText(e) {
  if (e instanceof Error) return `${e.name}: ${e.message}`;
  return `${typeof e}: ${String(e)}`;
}

function errorFrame(msg) {
  return Buffer.from(JSON.stringify({ error: msg }), 'utf8');
}

/* Runs snapvm-guest; throws with its message on failure. */
function runHelper(...args) {
  const r = childProcess.spawnSync(cfg.helper, args, { stdio: ['ignore', 'inherit', 'pipe'] });
  if (r.error) throw new Error(`${cfg.helper}: ${r.error.message}`);
  const err = (r.stderr || '').toString().trim();
  if (r.status !== 0) throw new Error(err || `${cfg.helper} ${args.join(' ')}: exit status ${r.status}`);
}

/* Writes the control port; returns whether the write happened. */
function control(value) {
  // A snapshot taken here holds the helper mid-outb; a restore finishes it.
  try {
    runHelper('outb', String(value));
    return true;
  } catch (e) {
    log(`control port ${value}: ${e.message}`);
    return false;
  }
}

function snapshotPoint() {
  if (typeof global.gc === 'function') global.gc(); // node --expose-gc
  if (!control(CONTROL_SNAPSHOT)) {
    // The VMM never saw this point, so a snapshot the host waits for would
    // never come: stop (init resets the machine) so the host learns it at
    // once, from the exit, instead of by a timeout.
    log('stopping: the snapshot point did not reach the VMM');
    process.exit(1);
  }
}

async function loadApp() {
  try {
    runHelper('mount-ro', cfg.appfs, cfg.appdir);
  } catch (e) {
    throw new Error(e.message);
  }
  const file = path.join(cfg.appdir, 'workload.js');
  if (!fs.existsSync(file)) throw new Error(`no workload.js in the appfs (${cfg.appfs})`);
  process.chdir(cfg.appdir);
  let mod;
  try {
    try {
      mod = require(file);
    } catch (e) {
      if (e.code !== 'ERR_REQUIRE_ESM') throw e;
      mod = await import(url.pathToFileURL(file).href);
    }
  } catch (e) {
    log(e && e.stack ? e.stack : String(e));
    throw new Error(`loading workload.js threw ${errorText(e)}`);
  }
  const exported = (name) => {
    const f = mod && (typeof mod[name] === 'function' ? mod[name] : mod.default && mod.default[name]);
    return typeof f === 'function' ? f : null;
  };
  const handle = exported('handle');
  const handleHttp = exported('handleHttp');
  if (handle === null && handleHttp === null) {
    throw new Error('workload.js exports no handle(request) function');
  }
  return { handle, handleHttp };
}

const ENVELOPE = 'snapvm.http';
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/* The request of an envelope, for handleHttp; throws on a bad one. */
function httpRequest(env) {
  if (!isObject(env)) throw new Error('the envelope is not an object');
  const headers = env.headers === undefined ? {} : env.headers;
  if (!isObject(headers) || !Object.values(headers).every((v) => typeof v === 'string')) {
    throw new Error("the envelope's headers are not an object of strings");
  }
  const b64 = env.body === undefined ? '' : env.body;
  if (typeof b64 !== 'string' || !BASE64.test(b64)) throw new Error("the envelope's body is not base64");
  return {
    method: String(env.method === undefined ? 'POST' : env.method),
    path: String(env.path === undefined ? '' : env.path),
    query: String(env.query === undefined ? '' : env.query),
    headers,
    body: Buffer.from(b64, 'base64'),
  };
}

/* An envelope body as handle(request) sees it: JSON, else text. */
function bodyValue(body) {
  let text;
  try {
    text = utf8.decode(body);
  } catch (e) {
    throw new Error('a body that is not UTF-8 needs handleHttp(request)');
  }
  if (text.trim() === '') return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    return text;
  }
}

/* handleHttp's result as a response envelope; throws on a bad one. */
function httpResponse(result) {
  if (!isObject(result)) throw new Error('handleHttp returned no object');
  const status = result.status === undefined ? 200 : result.status;
  if (!Number.isInteger(status) || status < 200 || status > 599) {
    throw new Error("handleHttp's status must be an integer from 200 to 599");
  }
  const headers = Object.assign({}, result.headers || {});
  let body = result.body === undefined ? Buffer.alloc(0) : result.body;
  if (typeof body === 'string') {
    body = Buffer.from(body, 'utf8');
  } else if (!Buffer.isBuffer(body)) {
    body = Buffer.from(JSON.stringify(body), 'utf8');
    if (!Object.keys(headers).some((k) => k.toLowerCase() === 'content-type')) {
      headers['content-type'] = 'application/json';
    }
  }
  if (!Object.values(headers).every((v) => typeof v === 'string')) {
    throw new Error("handleHttp's headers must be an object of strings");
  }
  return { [ENVELOPE]: { status, headers, body: body.toString('base64') } };
}

/* A connected stream socket as a file descriptor, read with fs.read (in
 * libuv's thread pool, so timers of the function still run meanwhile). */
class FdConn {
  constructor(fd) {
    this.fd = fd;
    this.buf = Buffer.allocUnsafe(CHUNK);
    this.start = 0;
    this.end = 0;
  }

  async readInto(target, offset, length) {
    for (;;) {
      try {
        const { bytesRead } = await fsRead(this.fd, target, offset, length, null);
        if (bytesRead === 0) throw new Closed('the host closed the connection');
        return bytesRead;
      } catch (e) {
        if (e.code !== 'EINTR' && e.code !== 'EAGAIN') throw e;
      }
    }
  }

  async readExact(n) {
    const out = Buffer.allocUnsafe(n);
    let got = Math.min(n, this.end - this.start);
    this.buf.copy(out, 0, this.start, this.start + got);
    this.start += got;
    while (got < n) {
      if (n - got >= CHUNK) {
        got += await this.readInto(out, got, n - got);
      } else {
        this.end = await this.readInto(this.buf, 0, CHUNK);
        this.start = Math.min(n - got, this.end);
        this.buf.copy(out, got, 0, this.start);
        got += this.start;
      }
    }
    return out;
  }

  async skip(n) {
    while (n > 0) {
      if (this.start === this.end) {
        this.end = await this.readInto(this.buf, 0, CHUNK);
        this.start = 0;
      }
      const k = Math.min(n, this.end - this.start);
      this.start += k;
      n -= k;
    }
  }

  async write(body) {
    const frame = Buffer.allocUnsafe(4 + body.length);
    frame.writeUInt32BE(body.length, 0);
    body.copy(frame, 4);
    let off = 0;
    while (off < frame.length) {
      try {
        const { bytesWritten } = await fsWrite(this.fd, frame, off, frame.length - off, null);
        off += bytesWritten;
      } catch (e) {
        if (e.code !== 'EINTR' && e.code !== 'EAGAIN') throw e;
      }
    }
  }

  close() {
    try {
      fs.closeSync(this.fd);
    } catch (e) {
      log(`close: ${e.message}`);
    }
  }
}

function connect() {
  const [kind, ...rest] = cfg.vsock.split(':');
  if (kind === 'unix') return native.connectUnix(rest.join(':'));
  if (kind === 'vsock' && rest.length === 2) return native.connectVsock(Number(rest[0]), Number(rest[1]));
  log(`bad SNAPVM_VSOCK ${JSON.stringify(cfg.vsock)}`);
  process.exit(2);
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/* Applies an init frame; returns an error message or null. */
function applyInit(init, text) {
  const seed = init.seed;
  if (typeof seed !== 'string' || !/^[0-9a-fA-F]{64}$/.test(seed)) return 'seed must be 64 hex characters';
  const v = init.realtime_ns;
  const bad = 'realtime_ns must be an integer 0..2^64-1';
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) return bad;
  // JSON.parse rounds integers past 2^53; take the exact digits from the
  // frame when they are unambiguous.
  const digits = text.match(/"realtime_ns"\s*:\s*(\d+)/g);
  const ns = digits && digits.length === 1 ? BigInt(digits[0].replace(/.*:\s*/, '')) : BigInt(v);
  if (ns >= 1n << 64n) return bad;
  try {
    native.seedRng(Buffer.from(seed, 'hex'));
    native.setRealtime(Number(ns / 1000000000n), Number(ns % 1000000000n));
  } catch (e) {
    return e.message;
  }
  return null;
}

class Agent {
  constructor() {
    this.handle = null;
    this.handleHttp = null;
    this.failure = null;
  }

  async call(request) {
    let envelope = null;
    if (isObject(request) && Object.keys(request).length === 1 && ENVELOPE in request) {
      envelope = request[ENVELOPE];
    }
    try {
      if (this.handleHttp !== null) {
        if (envelope === null) {
          envelope = {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: Buffer.from(JSON.stringify(request), 'utf8').toString('base64'),
          };
        }
        request = httpRequest(envelope);
      } else if (envelope !== null) {
        request = bodyValue(httpRequest(envelope).body);
      }
    } catch (e) {
      return errorFrame(`bad HTTP request: ${e.message}`);
    }
    let result;
    try {
      if (this.handleHttp !== null) {
        result = httpResponse(await this.handleHttp(request));
      } else {
        result = await this.handle(request);
      }
    } catch (e) {
      log(e && e.stack ? e.stack : String(e));
      return errorFrame(errorText(e));
    }
    if (!isObject(result)) {
      const kind = result === null ? 'null' : Array.isArray(result) ? 'an array' : typeof result;
      return errorFrame(`handle returned ${kind}, not an object`);
    }
    let text;
    try {
      text = JSON.stringify(result);
    } catch (e) {
      return errorFrame(`handle returned a value that is not JSON-serialisable: ${e.message}`);
    }
    if (typeof text !== 'string' || text[0] !== '{') {
      return errorFrame('handle returned a value that is not JSON-serialisable: not an object');
    }
    const body = Buffer.from(text, 'utf8');
    if (body.length > MAX_FRAME) {
      return errorFrame(`response of ${body.length} bytes exceeds the ${MAX_FRAME}-byte limit`);
    }
    return body;
  }

  async answer(body) {
    let text;
    let msg;
    try {
      text = utf8.decode(body);
      msg = JSON.parse(text);
    } catch (e) {
      return errorFrame('invalid json');
    }
    if (isObject(msg) && isObject(msg.init)) {
      const err = applyInit(msg.init, text);
      return err === null ? Buffer.from('{"ready":true}') : errorFrame(`bad init frame: ${err}`);
    }
    if (this.failure !== null) return errorFrame(`app load failed: ${this.failure}`);
    return this.call(msg);
  }

  async serve(conn) {
    for (;;) {
      const n = (await conn.readExact(4)).readUInt32BE(0);
      if (n > MAX_FRAME) {
        await conn.skip(n);
        await conn.write(errorFrame('request too large'));
        continue;
      }
      await conn.write(await this.answer(await conn.readExact(n)));
    }
  }

  async runForever() {
    let backoff = BACKOFF_MIN_MS;
    let quiet = false;
    for (;;) {
      let fd;
      try {
        fd = connect();
      } catch (e) {
        if (!quiet) log(`connecting to the host (${cfg.vsock}): ${e.message}; retrying`);
        quiet = true;
        await new Promise((resolve) => setTimeout(resolve, backoff));
        backoff = Math.min(2 * backoff, BACKOFF_MAX_MS);
        continue;
      }
      backoff = BACKOFF_MIN_MS;
      quiet = false;
      const conn = new FdConn(fd);
      try {
        await this.serve(conn);
      } catch (e) {
        log(`connection to the host lost (${e.message || e.code}); reconnecting`);
      } finally {
        conn.close();
      }
    }
  }
}

async function main() {
  // A function's stray asynchronous error is not a request's error, but it
  // must not kill the agent (and with it the VM) either.
  process.on('uncaughtException', (e) => log(`uncaught exception: ${e && e.stack ? e.stack : e}`));
  process.on('unhandledRejection', (e) => log(`unhandled rejection: ${e && e.stack ? e.stack : e}`));
  const agent = new Agent();
  snapshotPoint(); // language snapshot
  try {
    ({ handle: agent.handle, handleHttp: agent.handleHttp } = await loadApp());
  } catch (e) {
    agent.failure = e.message;
    log(`app load failed: ${e.message}`);
    control(CONTROL_APP_FAILED);
  }
  snapshotPoint(); // diff snapshot
  await agent.runForever();
}

main().catch((e) => {
  log(`agent failed: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
