"""archive (python3): packs the request's payload into a compressed tar.

Request:
    {"files": {"PATH": "text" | {"base64": "..."}, ...},  # or
     "payload": <any JSON value>,        # archived as payload.json
     "compression": "gzip",              # gzip (default), bz2, xz or none
     "level": 6,                         # 1..9 (xz: 0..9); default 6
     "mtime": 0,                         # member time stamps, Unix seconds
     "return_archive": true}             # false: sizes and digest only
Response:
    {"compression": "gzip", "files": n, "input_bytes": n, "tar_bytes": n,
     "compressed_bytes": n, "ratio": compressed/tar, "sha256": "<hex>",
     "archive": "<base64>"}              # unless return_archive is false

The archive is reproducible: members sorted by path, owned by 0:0 with
mode 0644 and the given mtime, POSIX (pax) format, and no time stamp in
the gzip header — the same request always gives the same sha256. PATH is
a relative path without "." or ".." components. A request over the limits
below raises ValueError (answered {"error": "ValueError: ..."}).
"""

import base64
import binascii
import bz2
import gzip
import hashlib
import io
import json
import lzma
import posixpath
import tarfile

MAX_INPUT_BYTES = 3 << 20  # the request frame is at most 4 MiB of JSON
MAX_ARCHIVE_B64 = 3_600_000  # leaves room in the 4 MiB response frame
MAX_FILES = 10_000
MAX_PATH = 1024
DEFAULT_LEVEL = 6


def _compressor(name, level):
    if name == "gzip":
        return lambda data: gzip.compress(data, compresslevel=level, mtime=0)
    if name == "bz2":
        return lambda data: bz2.compress(data, compresslevel=level)
    if name == "xz":
        return lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=level)
    if name == "none":
        return lambda data: data
    raise ValueError(f"compression must be gzip, bz2, xz or none, got {name!r}")


def _level(value, compression):
    if value is None:
        return DEFAULT_LEVEL
    low = 0 if compression == "xz" else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 9:
        raise ValueError(f"level must be an integer {low}..9 for {compression}")
    return value


def _path(name):
    if not isinstance(name, str) or not name or len(name.encode()) > MAX_PATH:
        raise ValueError(f"bad path {name!r}: 1..{MAX_PATH} bytes")
    if "\0" in name or name.startswith("/"):
        raise ValueError(f"bad path {name!r}: must be relative, without NUL")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad path {name!r}: no empty, '.' or '..' components")
    return posixpath.join(*parts)


def _content(name, value):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name}: not valid base64") from None
    raise ValueError(f'{name}: content must be a string or {{"base64": "..."}}')


def _members(request):
    if "files" in request:
        files = request["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError('"files" must be a non-empty object of PATH: content')
        if len(files) > MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} files")
        members = {}
        for name, value in files.items():
            path = _path(name)
            if path in members:
                raise ValueError(f"{name}: duplicate path")
            members[path] = _content(name, value)
        return members
    if "payload" in request:
        text = json.dumps(request["payload"], ensure_ascii=False, sort_keys=True,
                          separators=(",", ":"), allow_nan=False)
        return {"payload.json": text.encode("utf-8")}
    raise ValueError('the request needs "files" (PATH: content) or "payload"')


def make_tar(members, mtime):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(members):
            data = members[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def handle(request):
    if not isinstance(request, dict):
        raise ValueError('the request must be an object with "files" or "payload"')
    compression = request.get("compression", "gzip")
    if not isinstance(compression, str):
        raise ValueError("compression must be a string")
    compress = _compressor(compression, _level(request.get("level"), compression))
    mtime = request.get("mtime", 0)
    if not isinstance(mtime, int) or isinstance(mtime, bool) or not 0 <= mtime < 8**11:
        raise ValueError("mtime must be an integer 0..8^11-1 (Unix seconds)")
    want_archive = request.get("return_archive", True)
    if not isinstance(want_archive, bool):
        raise ValueError("return_archive must be true or false")

    members = _members(request)
    size = sum(len(d) for d in members.values())
    if size > MAX_INPUT_BYTES:
        raise ValueError(f"{size} bytes of input; the limit is {MAX_INPUT_BYTES}")
    tar = make_tar(members, mtime)
    packed = compress(tar)
    result = {
        "compression": compression,
        "files": len(members),
        "input_bytes": size,
        "tar_bytes": len(tar),
        "compressed_bytes": len(packed),
        "ratio": round(len(packed) / len(tar), 4),
        "sha256": hashlib.sha256(packed).hexdigest(),
    }
    if want_archive:
        encoded = base64.b64encode(packed).decode("ascii")
        if len(encoded) > MAX_ARCHIVE_B64:
            raise ValueError(f"the archive ({len(packed)} bytes) is too large to return "
                             'in a response; send "return_archive": false')
        result["archive"] = encoded
    return result
