"""The example set is consistent: every function has its workload, request
file and multivm entry, and the multivm example follows the schema of
src/multivm/config.rs and the tree scripts/mk-snapshots.sh makes."""

import json
import re
import subprocess
import unittest

from common import APPFS, REPO, REQUESTS, RUNTIMES, functions, node, runtime_of

MK_SNAPSHOTS = REPO / "scripts" / "mk-snapshots.sh"
EXAMPLE = REPO / "resources" / "multivm-example.yaml"
MK_SNAPSHOTS_MEM = 128  # its --mem default


def language_of(name):
    """The language label mk-snapshots.sh gives a function's image."""
    label = runtime_of(name)
    packages = APPFS / name / "debian-packages"
    if packages.exists():
        names = set()
        for line in packages.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(line)
        label += "".join(f"+{p}" for p in sorted(names))
    return label


def snapshot_of(name):
    """The language snapshot mk-snapshots.sh restores a function from: its
    image's label, with @net for a function that needs a network."""
    return language_of(name) + ("@net" if (APPFS / name / "network").exists() else "")


def schema_fields(struct):
    """Field names (and serde aliases) of a struct in src/multivm/config.rs."""
    src = (REPO / "src" / "multivm" / "config.rs").read_text()
    body = re.search(rf"struct {struct} \{{(.*?)\n\}}", src, re.S).group(1)
    fields = set(re.findall(r"^\s+(\w+):", body, re.M))
    fields |= set(re.findall(r'alias = "(\w+)"', body))
    return fields


class Examples(unittest.TestCase):
    def test_there_are_the_promised_functions(self):
        names = functions()
        self.assertIn("hello-python3", names)
        self.assertIn("hello-nodejs", names)
        self.assertGreaterEqual(len([n for n in names if n.endswith("-python3")]), 4)

    def test_each_function_has_its_runtime_workload_and_it_compiles(self):
        for name in functions():
            with self.subTest(function=name):
                self.assertRegex(name, r"^[a-z0-9]+(-[a-z0-9]+)*-(python3|nodejs)$")
                workload = APPFS / name / RUNTIMES[runtime_of(name)]
                self.assertTrue(workload.is_file())
                if workload.suffix == ".py":
                    compile(workload.read_text(), str(workload), "exec")
                else:
                    r = subprocess.run([node(), "--check", str(workload)], capture_output=True,
                                       text=True, check=False)
                    self.assertEqual(r.returncode, 0, r.stderr)
                packages = APPFS / name / "debian-packages"
                if packages.exists():
                    for line in packages.read_text().splitlines():
                        line = line.split("#", 1)[0].strip()
                        if line:
                            self.assertRegex(line, r"^[a-z0-9][a-z0-9+.-]+$")

    def test_request_files_match_the_functions_and_hold_json_lines(self):
        files = sorted(p.stem for p in REQUESTS.glob("*.json"))
        self.assertEqual(files, functions())
        for name in files:
            with self.subTest(function=name):
                lines = (REQUESTS / f"{name}.json").read_text(encoding="utf-8").split("\n")
                self.assertEqual(lines[-1], "", "ends with a newline")
                self.assertTrue(all(lines[:-1]), "no empty lines")
                docs = [json.loads(line) for line in lines[:-1]]
                # The first line is the one whose working set is recorded.
                self.assertIsInstance(docs[0], dict)
                self.assertLess(max(len(line.encode()) for line in lines), 4 << 20)

    def test_the_multivm_example_follows_the_schema_and_the_snapshot_tree(self):
        import yaml

        config = yaml.safe_load(EXAMPLE.read_text())
        self.assertLessEqual(set(config), schema_fields("RawConfig"))
        self.assertEqual(config["kernel_path"], "vmlinux")
        self.assertEqual((config["runtimefs_dir"], config["appfs_dir"], config["snapshot_dir"]),
                         ("images", "images", "."))
        self.assertEqual(sorted(config["functions"]), functions())
        allowed = schema_fields("RawFunction")
        for name, f in config["functions"].items():
            with self.subTest(function=name):
                self.assertLessEqual(set(f), allowed)
                label = language_of(name)
                self.assertEqual(f["runtimefs"], f"{label}.ext4")
                self.assertEqual(f["appfs"], f"{name}.ext2")
                self.assertEqual(f["load_dir"], f"{snapshot_of(name)},diff/{name}")
                self.assertEqual(f.get("network", False), snapshot_of(name).endswith("@net"))
                self.assertEqual(f.get("memory", 128), MK_SNAPSHOTS_MEM)
                self.assertEqual(f.get("vcpus", 1), 1)

    def test_mk_snapshots_checks_its_arguments_first(self):
        r = subprocess.run([str(MK_SNAPSHOTS), "--help"], capture_output=True, text=True,
                           timeout=10, check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--timeout", r.stdout)
        for args, message in [(["nope-python3"], "not a function"),
                              (["tests"], "not a function"),
                              (["--mem", "lots"], "--mem"),
                              (["--bogus"], "unknown option")]:
            with self.subTest(args=args):
                r = subprocess.run([str(MK_SNAPSHOTS), *args], capture_output=True, text=True,
                                   timeout=10, check=False)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn(message, r.stderr)


if __name__ == "__main__":
    unittest.main()
