"""appfs/mkappfs: ext2 images of function directories."""

import filecmp
import os
import shutil
import stat
import subprocess
import tempfile
import unittest
from pathlib import Path

from common import APPFS, MKAPPFS, functions


def mkappfs(src, out, env=None):
    return subprocess.run([str(MKAPPFS), str(src), str(out)], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def superblock(img):
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True,
                         check=True).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def unpack(img, into):
    Path(into).mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {into}", str(img)], check=True,
                   capture_output=True)
    return Path(into)


def tree(root, skip=("lost+found",)):
    """Relative path -> (kind, content or link target) of everything under root."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and d != "__pycache__"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = ("dir", None)
            elif not name.endswith(".pyc"):
                found[rel] = ("file", p.read_bytes())
    return found


class MkAppfs(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mkappfs-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def function_dir(self, name="fn", workload="workload.py"):
        d = self.tmp / name
        d.mkdir()
        (d / workload).write_text("def handle(request):\n    return {}\n")
        return d

    def assert_refused(self, src, out, message):
        r = mkappfs(src, out)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn(message, r.stderr)
        self.assertEqual(r.stdout, "")

    def leftovers(self):
        return [p.name for p in self.tmp.iterdir() if ".tmp." in p.name]

    def test_every_example_function_becomes_a_checked_ext2_image(self):
        for name in functions():
            with self.subTest(function=name):
                img = self.tmp / f"{name}.ext2"
                r = mkappfs(APPFS / name, img)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual(r.stdout.strip().splitlines()[-1], str(img.resolve()))
                sb = superblock(img)
                features = sb["Filesystem features"].split()
                self.assertNotIn("has_journal", features)  # ext2: no journal,
                self.assertFalse({"extent", "extents", "64bit"} & set(features))  # no ext4
                self.assertNotIn("resize_inode", features)
                self.assertEqual(sb["Reserved block count"], "0")
                size = int(sb["Block count"]) * int(sb["Block size"])
                self.assertEqual(img.stat().st_size, size)
                subprocess.run(["e2fsck", "-fn", str(img)], check=True, capture_output=True)
                got = tree(unpack(img, self.tmp / f"{name}.out"))
                self.assertEqual(got, tree(APPFS / name))
        self.assertEqual(self.leftovers(), [])

    def test_images_are_reproducible_and_sized_to_their_content(self):
        src = self.tmp / "copy"
        shutil.copytree(APPFS / "hello-python3", src)
        a, b = self.tmp / "a.ext2", self.tmp / "b.ext2"
        self.assertEqual(mkappfs(src, a).returncode, 0)
        os.utime(src / "workload.py", (1, 1))  # only the time stamps change
        self.assertEqual(mkappfs(src, b).returncode, 0)
        self.assertTrue(filecmp.cmp(a, b, shallow=False), "two builds differ")
        self.assertLessEqual(a.stat().st_size, 64 << 10)  # the ext2 minimum: 60 blocks
        (src / "data.bin").write_bytes(os.urandom(3 << 20))
        self.assertEqual(mkappfs(src, b).returncode, 0)
        self.assertEqual(superblock(b)["Block size"], "4096")
        self.assertLess(b.stat().st_size, (3 << 20) * 1.03 + (128 << 10))
        self.assertFalse(filecmp.cmp(a, b, shallow=False))

    def test_what_is_copied(self):
        src = self.function_dir(workload="workload.js")
        (src / "lib").mkdir()
        (src / "lib" / "secret.txt").write_text("x")
        (src / "lib" / "secret.txt").chmod(0o600)
        (src / "current").symlink_to("lib/secret.txt")
        (src / "__pycache__").mkdir()
        (src / "__pycache__" / "workload.cpython-311.pyc").write_bytes(b"\0")
        (src / "stale.pyc").write_bytes(b"\0")
        img = self.tmp / "f.ext2"
        self.assertEqual(mkappfs(src, img).returncode, 0)
        out = unpack(img, self.tmp / "out")
        self.assertFalse((out / "__pycache__").exists())
        self.assertFalse((out / "stale.pyc").exists())
        self.assertEqual(os.readlink(out / "current"), "lib/secret.txt")
        mode = stat.S_IMODE((out / "lib" / "secret.txt").stat().st_mode)
        self.assertEqual(mode & 0o044, 0o044)  # world-readable in the guest
        self.assertEqual(mode & 0o022, 0)

    def test_refuses_what_is_not_a_function(self):
        empty = self.tmp / "empty"
        empty.mkdir()
        (empty / "main.py").write_text("")
        out = self.tmp / "out.ext2"
        self.assert_refused(empty, out, "no workload.py or workload.js")
        self.assert_refused(empty / "main.py", out, "is not a directory")
        self.assert_refused(self.tmp / "absent", out, "is not a directory")
        fn = self.function_dir()
        self.assert_refused(fn, self.tmp / "no" / "such" / "dir.ext2", "does not exist")
        self.assert_refused(fn, self.tmp, "is a directory")
        linked = self.tmp / "linked"
        linked.mkdir()
        (linked / "workload.py").symlink_to(fn / "workload.py")
        self.assert_refused(linked, out, "must be a regular file")
        (fn / "escape").symlink_to("../linked")
        self.assert_refused(fn, out, "points outside")
        (fn / "escape").unlink()
        os.mkfifo(fn / "pipe")
        self.assert_refused(fn, out, "special file")
        self.assertFalse(out.exists())
        self.assertEqual(self.leftovers(), [])

    def test_a_refused_build_leaves_the_old_image_alone(self):
        fn = self.function_dir()
        out = self.tmp / "fn.ext2"
        self.assertEqual(mkappfs(fn, out).returncode, 0)
        before = out.read_bytes()
        (fn / "workload.py").unlink()
        self.assert_refused(fn, out, "no workload")
        self.assertEqual(out.read_bytes(), before)
        self.assertEqual(self.leftovers(), [])


if __name__ == "__main__":
    unittest.main()
