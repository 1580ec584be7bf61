"""Host-side tests of every example function's handle: its request file,
the answers it must give, and its errors — each also through the python3
agent's own response encoding (strict JSON, dict only, 4 MiB limit)."""

import base64
import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import struct
import tarfile
import unittest
import zlib

from common import functions, load, node_call, requests, runtime_of, through_agent

MAX_FRAME = 4 << 20


class EveryFunction(unittest.TestCase):
    def test_every_request_file_line_is_answered_without_error(self):
        for name in functions():
            reqs = requests(name)
            self.assertTrue(reqs, name)
            if runtime_of(name) == "nodejs":
                answers = [a.get("ok", a) for a in node_call(name, reqs)]
            else:
                answers = [through_agent(name, r) for r in reqs]
            for i, answer in enumerate(answers, 1):
                with self.subTest(function=name, line=i):
                    self.assertIsInstance(answer, dict)
                    self.assertNotIn("error", answer)
                    body = json.dumps(answer, allow_nan=False, separators=(",", ":"))
                    self.assertLess(len(body.encode()), MAX_FRAME)

    def test_a_bad_request_is_an_error_response_not_a_crash(self):
        for name in functions():
            if runtime_of(name) != "python3":
                continue
            for bad in (None, "text", 42, [1, 2], {"unexpected": True}):
                with self.subTest(function=name, request=bad):
                    answer = through_agent(name, bad)
                    self.assertIsInstance(answer, dict)
                    if "error" in answer:
                        self.assertTrue(answer["error"].startswith(("ValueError", "TypeError")),
                                        answer)


class Hello(unittest.TestCase):
    # The same answers as testguest's built-in hello (tests/guest/CONTRACT.md).
    CASES = [({"name": "snapvm"}, "hello, snapvm"), ({}, "hello, world"),
             ({"name": 5}, "hello, world"), ("x", "hello, world"), (None, "hello, world"),
             ({"name": "Zoë ✓"}, "hello, Zoë ✓")]

    def test_python3(self):
        for request, message in self.CASES:
            self.assertEqual(load("hello-python3").handle(request), {"message": message})

    def test_nodejs(self):
        answers = node_call("hello-nodejs", [r for r, _ in self.CASES])
        self.assertEqual(answers, [{"ok": {"message": m}} for _, m in self.CASES])


def image_b64(img, fmt, **opts):
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return base64.b64encode(buf.getvalue()).decode()


def decode(answer):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(answer["thumbnail"])))


class Thumbnail(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from PIL import Image

        cls.Image = Image
        cls.f = load("thumbnail-python3")

    def test_the_request_file_keeps_the_aspect_ratio(self):
        answer = self.f.handle(requests("thumbnail-python3")[0])
        self.assertEqual(answer["source"]["width"], 800)
        self.assertEqual((answer["width"], answer["height"]), (160, 120))
        img = decode(answer)
        self.assertEqual((img.format, img.size), ("JPEG", (160, 120)))
        self.assertEqual(answer["bytes"], len(base64.b64decode(answer["thumbnail"])))
        self.assertEqual(answer["mime"], "image/jpeg")

    def test_never_upscales(self):
        small = self.Image.new("RGB", (40, 30), (10, 20, 30))
        answer = self.f.handle({"image": image_b64(small, "PNG"), "size": [400, 400]})
        self.assertEqual((answer["width"], answer["height"]), (40, 30))

    def test_png_output_keeps_transparency_and_jpeg_flattens_it_onto_white(self):
        img = self.Image.new("RGBA", (100, 100), (0, 0, 0, 0))
        img.paste((255, 0, 0, 255), (25, 25, 75, 75))
        src = image_b64(img, "PNG")
        png = decode(self.f.handle({"image": src, "size": [50, 50], "format": "png"}))
        self.assertEqual(png.mode, "RGBA")
        self.assertEqual(png.getpixel((0, 0))[3], 0)
        jpeg = decode(self.f.handle({"image": src, "size": [50, 50]}))
        self.assertEqual(jpeg.mode, "RGB")
        self.assertTrue(all(c > 240 for c in jpeg.getpixel((0, 0))), jpeg.getpixel((0, 0)))
        r, g, b = jpeg.getpixel((25, 25))
        self.assertTrue(r > 200 and g < 60 and b < 60, (r, g, b))

    def test_exif_orientation_is_applied(self):
        img = self.Image.new("RGB", (200, 100), (0, 128, 255))
        exif = self.Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        src = image_b64(img, "JPEG", exif=exif.tobytes())
        answer = self.f.handle({"image": src, "size": [64, 64]})
        self.assertEqual((answer["width"], answer["height"]), (32, 64))

    def test_palette_gif_input_and_webp_output(self):
        img = self.Image.new("P", (120, 60))
        img.putpalette([i % 256 for i in range(768)])
        answer = self.f.handle({"image": image_b64(img, "GIF"), "size": [30, 30], "format": "PNG"})
        self.assertEqual(answer["source"]["format"], "GIF")
        self.assertEqual((answer["width"], answer["height"]), (30, 15))
        if "WEBP" in self.Image.SAVE:
            answer = self.f.handle({"image": image_b64(img, "GIF"), "format": "webp",
                                    "quality": 50})
            self.assertEqual(decode(answer).format, "WEBP")

    def test_bad_requests_raise_value_errors(self):
        ok = image_b64(self.Image.new("RGB", (8, 8)), "PNG")
        cases = [
            ({}, "non-empty base64"),
            ({"image": "not base64!"}, "not valid base64"),
            ({"image": base64.b64encode(b"plain text").decode()}, "not an image"),
            ({"image": ok, "size": [0, 10]}, "size must be"),
            ({"image": ok, "size": [10]}, "size must be"),
            ({"image": ok, "size": [True, 10]}, "size must be"),
            ({"image": ok, "format": "BMP"}, "format must be"),
            ({"image": ok, "quality": 100}, "quality"),
        ]
        for request, message in cases:
            with self.subTest(request=str(request)[:60]):
                with self.assertRaisesRegex(ValueError, message):
                    self.f.handle(request)

    def test_a_decompression_bomb_is_refused_before_decoding(self):
        for side in (7000, 10000):  # over our limit; also over Pillow's own
            # A valid 1x1 PNG whose header claims side x side pixels.
            buf = io.BytesIO()
            self.Image.new("RGB", (1, 1)).save(buf, "PNG")
            data = bytearray(buf.getvalue())
            ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
            data[16:29] = ihdr
            data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            with self.assertRaisesRegex(ValueError, "pixel limit"):
                self.f.handle({"image": base64.b64encode(bytes(data)).decode()})

    def test_a_truncated_image_is_an_error(self):
        full = base64.b64decode(requests("thumbnail-python3")[0]["image"])
        cut = base64.b64encode(full[: len(full) // 3]).decode()
        answer = through_agent("thumbnail-python3", {"image": cut})
        self.assertIn("error", answer)


class Logstats(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.f = load("logstats-python3")

    def test_the_request_file(self):
        answer = self.f.handle(requests("logstats-python3")[0])
        self.assertEqual(answer["records"], 400)
        self.assertEqual((answer["invalid"], answer["invalid_lines"]), (1, [202]))
        self.assertEqual(sum(answer["status"].values()), 400)
        self.assertEqual(sum(answer["status_class"].values()), 400)
        lat = answer["latency_ms"]
        self.assertEqual(lat["count"], 400)
        self.assertTrue(lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat)
        counts = [p["count"] for p in answer["top_paths"]]
        self.assertEqual(len(counts), 5)
        self.assertEqual(counts, sorted(counts, reverse=True))
        for p in answer["top_paths"]:
            self.assertFalse(any(seg.isdigit() for seg in p["path"].split("/")), p)
        self.assertGreater(answer["span"]["seconds"], 0)
        self.assertEqual(answer["methods"]["GET"] + answer["methods"]["POST"], 400)

    def test_exact_statistics_of_a_small_log(self):
        log = "\n".join(json.dumps({"path": f"/users/{i}?page=2", "status": 500 if i == 3 else 200,
                                    "ms": i, "bytes": 100, "method": "get",
                                    "ts": f"2024-01-01T00:00:{i:02d}+00:00"})
                        for i in range(1, 11))
        answer = self.f.handle({"log": log, "top": 1})
        self.assertEqual(answer["latency_ms"], {"count": 10, "mean": 5.5, "p50": 5.0,
                                                "p90": 9.0, "p99": 10.0, "max": 10.0})
        self.assertEqual(answer["top_paths"], [{"path": "/users/:id", "count": 10,
                                                "errors": 1, "p90_ms": 9.0}])
        self.assertEqual(answer["error_rate"], 0.1)
        self.assertEqual(answer["bytes"], 1000)
        self.assertEqual(answer["methods"], {"GET": 10})
        self.assertEqual(answer["span"]["seconds"], 9.0)

    def test_path_templates(self):
        t = self.f._template
        self.assertEqual(t("/users/42?x=1"), "/users/:id")
        self.assertEqual(t("/blobs/deadbeefcafe/raw"), "/blobs/:id/raw")
        self.assertEqual(t("/o/123e4567-e89b-12d3-a456-426614174000"), "/o/:id")
        self.assertEqual(t("/static/app.js"), "/static/app.js")
        self.assertEqual(t("?q=1"), "/")

    def test_non_finite_numbers_and_odd_records_are_left_out(self):
        log = '{"ms": NaN, "status": 200}\n{"ms": 5, "status": "200"}\n[1]\n\n{"status": 99}\n'
        answer = through_agent("logstats-python3", {"log": log})
        self.assertNotIn("error", answer)
        self.assertEqual((answer["records"], answer["invalid"]), (2, 2))
        self.assertEqual(answer["invalid_lines"], [1, 3])
        self.assertEqual(answer["latency_ms"]["count"], 1)
        self.assertEqual(answer["status"], {})
        # NaN inside "records" (the agent's json.loads accepts it) too.
        answer = through_agent("logstats-python3", {"records": [{"ms": float("nan")}, 7]})
        self.assertNotIn("error", answer)
        self.assertIsNone(answer["latency_ms"])
        self.assertEqual(answer["invalid_lines"], [2])

    def test_bad_requests(self):
        for request, message in [({}, "needs"), ({"log": 5}, "string"),
                                 ({"records": {}}, "list"), ({"log": "", "top": 0}, "top")]:
            with self.assertRaisesRegex(ValueError, message):
                self.f.handle(request)
        self.assertEqual(self.f.handle({"log": ""})["records"], 0)


class Wordcount(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.f = load("wordcount-python3")

    def test_the_request_file(self):
        answer = self.f.handle(requests("wordcount-python3")[0])
        self.assertEqual((answer["words"], answer["sentences"], answer["lines"]), (196, 11, 17))
        self.assertEqual(answer["top"][0], ["function", 5])
        self.assertEqual(len(answer["top"]), 10)
        self.assertFalse({"the", "a", "is"} & {w for w, _ in answer["top"]})

    def test_stopwords_ship_in_the_appfs(self):
        self.assertIn("the", self.f.STOPWORDS)
        self.assertGreater(len(self.f.STOPWORDS), 100)
        answer = self.f.handle({"text": "the cat and the hat", "stopwords": False, "top": 1})
        self.assertEqual(answer["top"], [["the", 2]])
        self.assertEqual(self.f.handle({"text": "To be, or not to be?"})["top"], [])

    def test_words_and_sentences(self):
        answer = self.f.handle({"text": "Don't stop. DON’T stop! Grüße, GRÜSSE? 42 apples\nend",
                                "top": 3})
        # Casefolded: DON’T is don't (a stop word), Grüße is GRÜSSE.
        self.assertEqual(answer["top"], [["grüsse", 2], ["stop", 2], ["apples", 1]])
        self.assertEqual(answer["words"], 8)  # 42 is not a word
        self.assertEqual(answer["unique_words"], 5)
        self.assertEqual(answer["sentences"], 4)
        self.assertEqual(answer["lines"], 2)
        self.assertEqual(self.f.handle({"text": 'He said "stop." Then left'})["sentences"], 2)
        empty = self.f.handle({"text": "  "})
        self.assertEqual((empty["words"], empty["sentences"], empty["top"]), (0, 0, []))

    def test_bad_requests(self):
        for request in ({}, {"text": 5}, {"text": "a", "top": -1}, {"text": "a", "top": 101},
                        {"text": "a", "stopwords": "no"}):
            with self.assertRaises(ValueError):
                self.f.handle(request)


class Archive(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.f = load("archive-python3")

    def unpack(self, answer):
        packed = base64.b64decode(answer["archive"])
        self.assertEqual(hashlib.sha256(packed).hexdigest(), answer["sha256"])
        self.assertEqual(len(packed), answer["compressed_bytes"])
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:*") as tar:
            members = tar.getmembers()
            return members, {m.name: tar.extractfile(m).read() for m in members}

    def test_the_request_file_round_trips(self):
        request = requests("archive-python3")[0]
        answer = self.f.handle(request)
        members, files = self.unpack(answer)
        self.assertEqual([m.name for m in members], sorted(request["files"]))
        self.assertEqual(files["README.md"], request["files"]["README.md"].encode())
        self.assertEqual(files["bin/blob"], bytes(range(256)) * 16)
        self.assertTrue(all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members))
        self.assertEqual(gzip.decompress(base64.b64decode(answer["archive"]))[:9], b"README.md")
        self.assertLess(answer["ratio"], 0.5)

    def test_archives_are_reproducible(self):
        request = requests("archive-python3")[0]
        self.assertEqual(self.f.handle(request)["sha256"], self.f.handle(request)["sha256"])

    def test_every_compression(self):
        files = {"a.txt": "alpha " * 100, "d/b.bin": {"base64": base64.b64encode(b"\0\1\2").decode()}}
        magic = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ", "none": b"a.txt"}
        unpack = {"gzip": gzip.decompress, "bz2": bz2.decompress, "xz": lzma.decompress,
                  "none": lambda b: b}
        for comp, head in magic.items():
            with self.subTest(compression=comp):
                answer = self.f.handle({"files": files, "compression": comp, "level": 1})
                packed = base64.b64decode(answer["archive"])
                self.assertTrue(packed.startswith(head))
                self.assertEqual(len(unpack[comp](packed)), answer["tar_bytes"])
                _, got = self.unpack(answer)
                self.assertEqual(got, {"a.txt": b"alpha " * 100, "d/b.bin": b"\0\1\2"})

    def test_payload_and_sizes_only(self):
        answer = self.f.handle({"payload": {"b": [1, 2], "a": "é"}, "mtime": 1700000000})
        members, files = self.unpack(answer)
        self.assertEqual(files, {"payload.json": '{"a":"é","b":[1,2]}'.encode()})
        self.assertEqual(members[0].mtime, 1700000000)
        answer = self.f.handle(requests("archive-python3")[1])
        self.assertNotIn("archive", answer)
        self.assertEqual(answer["compression"], "xz")

    def test_unsafe_paths_and_bad_requests_are_refused(self):
        for path in ("/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "", "d/", "a\0b"):
            with self.subTest(path=path):
                with self.assertRaisesRegex(ValueError, "bad path"):
                    self.f.handle({"files": {path: "x"}})
        for request, message in [({}, "needs"), ({"files": {}}, "non-empty"),
                                 ({"files": {"a": 5}}, "content"),
                                 ({"files": {"a": {"base64": "!!"}}}, "base64"),
                                 ({"payload": 1, "compression": "zip"}, "compression"),
                                 ({"payload": 1, "level": 0}, "level"),
                                 ({"payload": 1, "mtime": -1}, "mtime"),
                                 ({"payload": 1, "return_archive": "yes"}, "return_archive")]:
            with self.subTest(request=request):
                with self.assertRaisesRegex(ValueError, message):
                    self.f.handle(request)
        self.f.handle({"payload": 1, "compression": "xz", "level": 0})  # xz allows 0

    def test_size_limits(self):
        with self.assertRaisesRegex(ValueError, "limit"):
            self.f.handle({"files": {"big": "x" * (3 << 20 | 1)}})
        noise = random.Random(1).randbytes(2_800_000)
        request = {"files": {"noise": {"base64": base64.b64encode(noise).decode()}},
                   "compression": "none"}
        answer = through_agent("archive-python3", request)
        self.assertIn("too large to return", answer["error"])
        request["return_archive"] = False
        self.assertEqual(self.f.handle(request)["input_bytes"], 2_800_000)


if __name__ == "__main__":
    unittest.main()
