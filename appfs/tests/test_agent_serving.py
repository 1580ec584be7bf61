"""Every example function served by the real guest agent process, as in a
VM but for the kernel: rootfs/tests/harness.py starts the runtime's agent
over a Unix socket standing in for vsock, with the control port, mount and
RNG logged instead of done; the function directory stands in for the
mounted appfs. The agent must go 124, mount, 124 (no 125: the app loads),
answer the init frame, and answer every line of the function's request
file as the function's handle does.

With SNAPVM_APPFS_TEST_IMAGES (scripts/appfs-test.sh --images) the same
runs again in a chroot of each function's own language image (python3,
python3+python3-pil, nodejs from rootfs/mk_rtimage.sh): the image's
runtime, libraries (Pillow), helper and addon.
"""

import json
import os
import shutil
import sys
import tempfile
import unittest

from common import APPFS, REPO, functions, load, requests, runtime_of

sys.path.insert(0, str(REPO / "rootfs" / "tests"))
os.environ.setdefault("SNAPVM_TEST_PYTHON", sys.executable)  # Debian's, with Pillow
import harness  # noqa: E402  (rootfs/tests)

# Parts of an answer that depend on the exact codec library build.
CODEC_BYTES = {"thumbnail-python3": ("thumbnail", "bytes")}


def comparable(name, answer):
    answer = dict(answer)
    for key in CODEC_BYTES.get(name, ()):
        answer.pop(key, None)
    return answer


class Serving:
    """Mixin: serve each function's request file through the agent."""

    root_of = staticmethod(lambda name: None)

    def serve(self, name):
        root = self.root_of(name)
        tmp = tempfile.mkdtemp(prefix="appfs-agent-", dir=os.path.join(root, "tmp") if root else None)
        self.addCleanup(shutil.rmtree, tmp, True)
        host = harness.Host(runtime_of(name), tmp, root)
        self.addCleanup(host.stop)
        shutil.copytree(APPFS / name, host.app)
        host.start()
        conn = host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(), {"ready": True})
        mount = f"mount /dev/vdb {host.inner(host.app)} ro"
        self.assertEqual(host.ops()[:3], ["outb 0x3f0 124", mount, "outb 0x3f0 124"],
                         host.output())
        answers = [conn.call(r) for r in requests(name)]
        for i, answer in enumerate(answers, 1):
            self.assertNotIn("error", answer, f"{name} line {i}: {host.output()[-2000:]}")
        return answers

    def check(self, name):
        answers = self.serve(name)
        if runtime_of(name) == "python3":
            expected = [json.loads(json.dumps(load(name).handle(r))) for r in requests(name)]
            self.assertEqual([comparable(name, a) for a in answers],
                             [comparable(name, e) for e in expected])
        else:
            self.assertEqual(answers[0], {"message": "hello, snapvm"})


def add_tests(cls):
    for name in functions():
        def test(self, name=name):
            self.check(name)
        setattr(cls, f"test_{name.replace('-', '_')}", test)
    return cls


@add_tests
class OnTheHost(Serving, unittest.TestCase):
    """The agents on the host's Debian python3 and node."""


def image_roots():
    """language label -> image path, from SNAPVM_APPFS_TEST_IMAGES
    ("python3=/x.img,python3+python3-pil=/y.img,...")."""
    spec = os.environ.get("SNAPVM_APPFS_TEST_IMAGES", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


if image_roots():
    from test_examples import language_of

    _unpacked = {}

    def unpacked(label):
        if label not in _unpacked:
            image = image_roots().get(label)
            if image is None:
                raise AssertionError(f"SNAPVM_APPFS_TEST_IMAGES has no {label} image")
            _unpacked[label] = str(harness.unpack_image(
                image, tempfile.mkdtemp(prefix=f"appfs-root-{label}-")))
        return _unpacked[label]

    def tearDownModule():
        for root in _unpacked.values():
            shutil.rmtree(root, True)

    @add_tests
    class InTheImages(Serving, unittest.TestCase):
        """The agents in a chroot of each function's language image."""

        root_of = staticmethod(lambda name: unpacked(language_of(name)))

        def test_thumbnail_without_its_debian_packages_fails_to_load(self):
            # In the plain python3 image (no python3-pil) the import fails:
            # 125 before the diff snapshot point, then an error per request.
            root = unpacked("python3")
            tmp = tempfile.mkdtemp(prefix="appfs-agent-", dir=os.path.join(root, "tmp"))
            self.addCleanup(shutil.rmtree, tmp, True)
            host = harness.Host("python3", tmp, root)
            self.addCleanup(host.stop)
            shutil.copytree(APPFS / "thumbnail-python3", host.app)
            host.start()
            conn = host.accept()
            self.addCleanup(conn.close)
            self.assertEqual(conn.init(), {"ready": True})
            self.assertEqual(host.ops()[2:4], ["outb 0x3f0 125", "outb 0x3f0 124"])
            answer = conn.call(requests("thumbnail-python3")[1])
            self.assertIn("app load failed", answer["error"])
            self.assertIn("PIL", answer["error"])


if __name__ == "__main__":
    unittest.main()
