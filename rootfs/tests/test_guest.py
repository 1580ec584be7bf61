"""Host-side tests of snapvm-guest (init, control port, mount) in test mode.

SNAPVM_GUEST_FAKE makes every privileged operation a line in a log file, so
nothing here touches the host's ports, mounts or clock.
"""

import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from harness import native_dir

INIT_MOUNTS = [
    "mount proc /proc proc",
    "mount sysfs /sys sysfs",
    "mount devtmpfs /dev devtmpfs",
    "mount tmpfs /dev/shm tmpfs",
    "mount tmpfs /tmp tmpfs",
    "outb 0x3f0 123",
]


class GuestHelperTests(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="snapvm-guest-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.log = self.tmp / "ops.log"
        self.helper = native_dir() / "snapvm-guest"

    def run_helper(self, *args, argv0=None, fake=True, extra_env=None):
        env = {"PATH": "/usr/bin:/bin"}
        if fake:
            env["SNAPVM_GUEST_FAKE"] = str(self.log)
        env.update(extra_env or {})
        return subprocess.run([str(argv0 or self.helper), *args], env=env, capture_output=True,
                              text=True, timeout=30, check=False)

    def ops(self):
        return self.log.read_text().splitlines() if self.log.exists() else []

    # --- control port ---------------------------------------------------

    def test_outb_writes_the_byte(self):
        for b in ("124", "125", "0", "255"):
            self.assertEqual(self.run_helper("outb", b).returncode, 0)
        self.assertEqual(self.ops(), ["outb 0x3f0 124", "outb 0x3f0 125", "outb 0x3f0 0",
                                      "outb 0x3f0 255"])

    def test_outb_refuses_what_is_not_a_byte(self):
        for bad in ("256", "-1", "abc", "", "12x", "0x7c", " 1"):
            r = self.run_helper("outb", bad)
            self.assertEqual(r.returncode, 2, bad)
            self.assertIn("is not a byte", r.stderr)
        self.assertEqual(self.ops(), [])

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
    def test_outb_without_privilege_fails_with_a_message(self):
        # Real mode, but as nobody: opening /dev/port is refused before any
        # port I/O.
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "--inh-caps=-all", "--bounding-set=-all", str(self.helper), "outb",
                            "124"], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, timeout=30, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        # EACCES; ENOENT on kernels without CONFIG_DEVPORT (like this
        # host's: the guest kernel has it).
        self.assertRegex(r.stderr, r"/dev/port: (Permission denied|No such file or directory)")

    # --- mount ----------------------------------------------------------

    def test_mount_ro(self):
        app = self.tmp / "srv"
        app.mkdir()
        self.assertEqual(self.run_helper("mount-ro", "/dev/vdb", str(app)).returncode, 0)
        self.assertEqual(self.ops(), [f"mount /dev/vdb {app} ro"])

    def test_mount_ro_fails_like_mount(self):
        r = self.run_helper("mount-ro", "/dev/vdb", str(self.tmp / "missing"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot mount /dev/vdb read-only", r.stderr)
        self.assertIn("No such file or directory", r.stderr)
        (self.tmp / "file").write_text("")
        r = self.run_helper("mount-ro", "/dev/vdb", str(self.tmp / "file"))
        self.assertIn("Not a directory", r.stderr)
        self.assertEqual(self.ops(), [])

    def test_usage(self):
        self.assertEqual(self.run_helper().returncode, 2)
        self.assertEqual(self.run_helper("outb").returncode, 2)
        self.assertEqual(self.run_helper("bogus", "x").returncode, 2)
        r = self.run_helper("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("outb BYTE", r.stdout)

    # --- init -----------------------------------------------------------

    def write_conf(self, argv, env_lines):
        conf = self.tmp / "conf"
        conf.mkdir(exist_ok=True)
        (conf / "agent.argv").write_text("# argv\n\n" + "".join(a + "\n" for a in argv))
        (conf / "agent.env").write_text("# env\n" + "".join(e + "\n" for e in env_lines))
        return conf

    def run_init(self, conf, argv0=None):
        args = () if argv0 else ("init",)
        return self.run_helper(*args, argv0=argv0, extra_env={"SNAPVM_INIT_CONF": str(conf)})

    def test_init_mounts_reports_boot_and_runs_the_agent_with_its_env(self):
        out = self.tmp / "agent.out"
        conf = self.write_conf(["/bin/sh", "-c", f'echo "$*" >{out}; env >>{out}; exit 3',
                                "sh", "one arg", "two"], ["FOO=bar baz", "PATH=/bin"])
        r = self.run_init(conf)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertEqual(self.ops(), INIT_MOUNTS + ["reboot"])
        self.assertIn("the agent exited with status 3; restarting the machine", r.stderr)
        lines = out.read_text().splitlines()
        self.assertEqual(lines[0], "one arg two")
        self.assertIn("FOO=bar baz", lines)
        # Only agent.env reaches the agent (sh adds PWD and the like).
        self.assertFalse([line for line in lines if line.startswith("SNAPVM_")], lines)

    def test_init_by_the_name_init(self):
        link = self.tmp / "init"
        link.symlink_to(self.helper)
        conf = self.write_conf(["/bin/true"], [])
        r = self.run_init(conf, argv0=link)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.ops(), INIT_MOUNTS + ["reboot"])

    def test_init_reports_an_agent_killed_by_a_signal(self):
        conf = self.write_conf(["/bin/sh", "-c", "kill -9 $$"], [])
        r = self.run_init(conf)
        self.assertEqual(r.returncode, 128 + 9)
        self.assertIn("killed by signal 9", r.stderr)
        self.assertEqual(self.ops()[-1], "reboot")

    def test_init_without_an_agent_restarts_the_machine(self):
        conf = self.tmp / "empty"
        conf.mkdir()
        r = self.run_init(conf)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no agent to run", r.stderr)
        self.assertEqual(self.ops(), INIT_MOUNTS + ["reboot"])

    def test_init_with_an_agent_that_cannot_run(self):
        conf = self.write_conf([str(self.tmp / "nonexistent")], [])
        r = self.run_init(conf)
        self.assertEqual(r.returncode, 127)
        self.assertIn("cannot run the agent", r.stderr)
        self.assertEqual(self.ops()[-1], "reboot")


if __name__ == "__main__":
    unittest.main()
