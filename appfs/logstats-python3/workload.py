"""logstats (python3): JSON processing — summarises an HTTP access log.

Request:
    {"log": "<NDJSON: one JSON object per line>",   # or
     "records": [{...}, ...],                       # the objects themselves
     "top": 5}                                      # paths to list, 1..100
Each record may have: "ts" (ISO 8601), "method", "path", "status" (int),
"ms" (latency, number), "bytes" (int); a missing or mistyped field leaves
the record out of that one statistic. Lines that are not JSON objects are
counted as invalid (their line numbers, up to 10, are listed).

Response:
    {"records": n, "invalid": k, "invalid_lines": [...],
     "status": {"200": n, ...}, "status_class": {"2xx": n, ...},
     "error_rate": 5xx share, "methods": {"GET": n, ...}, "bytes": total,
     "latency_ms": {"count", "mean", "p50", "p90", "p99", "max"} | null,
     "top_paths": [{"path", "count", "errors", "p90_ms"}, ...],
     "span": {"first", "last", "seconds"} | null}
Paths are grouped as templates: the query string is dropped and numeric
or hexadecimal id segments become ":id" (/users/42?x=1 -> /users/:id).
Everything is deterministic (ties sorted by name).
"""

import json
import math
import re
from collections import Counter, defaultdict
from datetime import datetime, timezone

DEFAULT_TOP = 5
MAX_TOP = 100
MAX_INVALID_LINES = 10
ID_SEGMENT = re.compile(r"^(?:\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F-]{36})$")


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_ndjson(text):
    records, invalid = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except ValueError:
            invalid.append(n)
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            invalid.append(n)
    return records, invalid


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def _template(path):
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    parts = [":id" if ID_SEGMENT.match(p) else p for p in path.split("/")]
    return "/".join(parts)


def _timestamp(v):
    if not isinstance(v, str):
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _percentile(ordered, p):
    """Nearest-rank percentile of a sorted, non-empty list."""
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


def _round(x):
    return round(float(x), 3)


def _top(value):
    if value is None:
        return DEFAULT_TOP
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOP:
        raise ValueError(f"top must be an integer 1..{MAX_TOP}")
    return value


def summarise(records, top=DEFAULT_TOP):
    status, classes, methods = Counter(), Counter(), Counter()
    latencies = []
    by_path = defaultdict(list)  # template -> [(status, ms)]
    total_bytes = 0
    first = last = None
    for rec in records:
        code = rec.get("status")
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
            status[str(code)] += 1
            classes[f"{code // 100}xx"] += 1
        else:
            code = None
        method = rec.get("method")
        if isinstance(method, str) and method:
            methods[method.upper()] += 1
        ms = _number(rec.get("ms"))
        if ms is not None and ms >= 0:
            latencies.append(ms)
        else:
            ms = None
        size = rec.get("bytes")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            total_bytes += size
        path = rec.get("path")
        if isinstance(path, str) and path:
            by_path[_template(path)].append((code, ms))
        t = _timestamp(rec.get("ts"))
        if t is not None:
            first = t if first is None or t < first else first
            last = t if last is None or t > last else last

    latency = None
    if latencies:
        ordered = sorted(latencies)
        latency = {
            "count": len(ordered),
            "mean": _round(sum(ordered) / len(ordered)),
            "p50": _round(_percentile(ordered, 50)),
            "p90": _round(_percentile(ordered, 90)),
            "p99": _round(_percentile(ordered, 99)),
            "max": _round(ordered[-1]),
        }
    paths = []
    for path, hits in sorted(by_path.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]:
        ms = sorted(m for _, m in hits if m is not None)
        paths.append({
            "path": path,
            "count": len(hits),
            "errors": sum(1 for c, _ in hits if c is not None and c >= 500),
            "p90_ms": _round(_percentile(ms, 90)) if ms else None,
        })
    span = None
    if first is not None:
        span = {"first": first.isoformat(), "last": last.isoformat(),
                "seconds": _round((last - first).total_seconds())}
    return {
        "records": len(records),
        "status": dict(sorted(status.items())),
        "status_class": dict(sorted(classes.items())),
        "error_rate": round(classes["5xx"] / len(records), 4) if records else 0.0,
        "methods": dict(sorted(methods.items())),
        "bytes": total_bytes,
        "latency_ms": latency,
        "top_paths": paths,
        "span": span,
    }


def handle(request):
    if not isinstance(request, dict):
        raise ValueError('the request must be an object with "log" or "records"')
    top = _top(request.get("top"))
    if "log" in request:
        if not isinstance(request["log"], str):
            raise ValueError('"log" must be a string of JSON lines')
        records, invalid = _parse_ndjson(request["log"])
    elif "records" in request:
        if not isinstance(request["records"], list):
            raise ValueError('"records" must be a list of objects')
        records, invalid = [], []
        for n, rec in enumerate(request["records"], 1):
            if isinstance(rec, dict):
                records.append(rec)
            else:
                invalid.append(n)
    else:
        raise ValueError('the request needs "log" (NDJSON text) or "records" (a list)')
    result = summarise(records, top)
    result["invalid"] = len(invalid)
    result["invalid_lines"] = invalid[:MAX_INVALID_LINES]
    return result
