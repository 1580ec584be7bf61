"""Writes the answers the host-side tests expect from every example
function to its request file: OUT_DIR/<function>.answers, one JSON line per
request line, as the guest would send them (python3 functions through the
real agent's Agent.call, nodejs ones through node). The Linux end-to-end
tests (tests/linux.rs) compare what each function answers inside a VM with
these; run it with the Debian python3 and packages the images carry
(scripts/appfs-test.sh installs them).

    python3 appfs/tests/answers.py OUT_DIR
"""

import json
import sys
from pathlib import Path

from common import functions, node_call, requests, runtime_of, through_agent


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in functions():
        reqs = requests(name)
        if runtime_of(name) == "nodejs":
            answers = [a["ok"] if "ok" in a else {"error": a["error"]} for a in node_call(name, reqs)]
        else:
            answers = [through_agent(name, r) for r in reqs]
        tmp = out / f"{name}.answers.tmp"
        tmp.write_text("".join(json.dumps(a, sort_keys=True) + "\n" for a in answers),
                       encoding="utf-8")
        tmp.replace(out / f"{name}.answers")
        print(out / f"{name}.answers")


if __name__ == "__main__":
    main()
