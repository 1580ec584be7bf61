"""Writes the example request files resources/requests/<function>.json.

    /usr/bin/python3 appfs/tests/make_requests.py      (needs Pillow)

A request file holds one JSON request per line, the format singlevm reads
on stdin; the first line is the request whose working set
scripts/mk-snapshots.sh records, so it is the representative one. The
data is synthetic and generated from fixed seeds: running this again
gives the same files (the thumbnail's JPEG bytes may differ with another
libjpeg).
"""

import base64
import io
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "resources" / "requests"

TEXT = """\
A snapshot is a promise about the past. When a function is called for the
first time, the machine that runs it has to be built: a kernel boots, a
language runtime starts, libraries are imported, and only then does the
first line of the function run. Most of that work is the same every time.
So we do it once, write the whole machine to disk, and restore it when a
request arrives.

The language snapshot holds a runtime that is ready but has no function in
it. The diff snapshot holds only the pages that changed once the function
was loaded. The working set lists the pages a real request touched, in the
order it touched them, so a restore can fetch them before they are needed.

Does it work? On an ordinary host with hardware virtualisation, a restored
machine answers in milliseconds where a cold boot takes a second or more.
The memory that clones share is read from the same file, and each clone
gets a fresh seed for its random numbers and the right time of day. What
is left is the function itself: its own work, on its own machine.
"""


def write(name, requests):
    path = OUT / f"{name}.json"
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in requests]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"{path.relative_to(REPO)}: {len(lines)} request(s), {path.stat().st_size} bytes")


def photo(width, height, seed):
    """A synthetic photo-like picture: a sky gradient, hills and a sun."""
    from PIL import Image, ImageDraw, ImageFilter

    rnd = random.Random(seed)
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(70 + 120 * t), int(130 + 80 * t), int(220 - 60 * t)))
    draw.ellipse([width * 0.7, height * 0.1, width * 0.85, height * 0.1 + width * 0.15],
                 fill=(255, 220, 120))
    for layer in range(4):
        base = height * (0.55 + 0.1 * layer)
        points = [(0, height)]
        for x in range(0, width + 40, 40):
            points.append((x, base - rnd.uniform(0, height * 0.15)))
        points.append((width, height))
        shade = 40 + 30 * layer
        draw.polygon(points, fill=(shade // 2, 90 + shade, shade // 3))
    for _ in range(300):
        x, y = rnd.randrange(width), rnd.randrange(height // 2, height)
        draw.point((x, y), fill=(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    return img.filter(ImageFilter.SMOOTH)


def encoded(img, fmt, **opts):
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_requests():
    from PIL import Image, ImageDraw

    big = photo(800, 600, seed=12)
    logo = Image.new("RGBA", (240, 160), (0, 0, 0, 0))
    ImageDraw.Draw(logo).rounded_rectangle([10, 10, 230, 150], radius=30, fill=(200, 40, 60, 255))
    return [
        {"image": encoded(big, "JPEG", quality=80), "size": [160, 160], "format": "JPEG",
         "quality": 85},
        {"image": encoded(logo, "PNG"), "size": [64, 64], "format": "JPEG"},
    ]


def access_log(n, seed):
    rnd = random.Random(seed)
    paths = ["/", "/api/users/{id}", "/api/orders/{id}", "/api/orders", "/static/app.js",
             "/static/style.css", "/login", "/api/search?q={id}", "/healthz"]
    weights = [8, 20, 15, 10, 12, 12, 5, 10, 8]
    lines = []
    second = 1_700_000_000
    for i in range(n):
        second += rnd.randrange(0, 3)
        path = rnd.choices(paths, weights)[0].replace("{id}", str(rnd.randrange(1, 5000)))
        status = rnd.choices([200, 201, 304, 404, 500, 503], [80, 5, 6, 5, 3, 1])[0]
        rec = {
            "ts": f"2023-11-14T22:{(second // 60) % 60:02d}:{second % 60:02d}Z",
            "method": "POST" if path in ("/api/orders", "/login") else "GET",
            "path": path,
            "status": status,
            "ms": round(rnd.lognormvariate(3.0, 0.8), 2),
            "bytes": rnd.randrange(200, 40_000),
        }
        lines.append(json.dumps(rec, separators=(",", ":")))
        if i == n // 2:
            lines.append("this line is not JSON")
    return "\n".join(lines) + "\n"


def main():
    sys.dont_write_bytecode = True
    write("hello-python3", [{"name": "snapvm"}, {}])
    write("hello-nodejs", [{"name": "snapvm"}, {}])
    write("thumbnail-python3", thumbnail_requests())
    write("logstats-python3", [{"log": access_log(400, seed=7), "top": 5},
                               {"records": [{"path": "/a", "status": 200, "ms": 3}], "top": 1}])
    write("wordcount-python3", [{"text": TEXT, "top": 10}, {"text": "To be, or not to be?"}])
    write("archive-python3", [
        {"files": {"README.md": TEXT, "logs/access.ndjson": access_log(200, seed=3),
                   "bin/blob": {"base64": base64.b64encode(bytes(range(256)) * 16).decode()}},
         "compression": "gzip", "level": 6},
        {"payload": {"text": TEXT}, "compression": "xz", "return_archive": False},
    ])


if __name__ == "__main__":
    main()
