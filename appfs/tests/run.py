"""Runs every test in appfs/tests; the last line is "appfs: N passed, N failed".

    python3 appfs/tests/run.py [-v] [PATTERN]

Use Debian's python3 (/usr/bin/python3 with python3-pil), the interpreter
and Pillow the language images carry; scripts/appfs-test.sh does that and
installs what is missing. PATTERN (a unittest -k pattern) picks tests.
"""

import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    sys.dont_write_bytecode = True  # nothing generated in the work tree
    sys.path.insert(0, str(HERE))
    args = [a for a in sys.argv[1:] if a != "-v"]
    loader = unittest.TestLoader()
    if args:
        loader.testNamePatterns = [f"*{a}*" for a in args]
    suite = loader.discover(str(HERE), pattern="test_*.py")
    result = unittest.TextTestRunner(verbosity=2 if "-v" in sys.argv else 1).run(suite)
    # A skipped test counts as failed: every test here must run.
    failed = (len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
              + len(result.skipped))
    passed = result.testsRun - failed
    print(f"appfs: {passed} passed, {failed} failed")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
