"""Helpers of the host-side function tests: load a function as the guest
agent does, run its request file, pass results through the real agent's
response encoding, and call nodejs functions through node."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APPFS = REPO / "appfs"
REQUESTS = REPO / "resources" / "requests"
MKAPPFS = APPFS / "mkappfs"
RUNTIMES = {"python3": "workload.py", "nodejs": "workload.js"}
NODE_CALL = Path(__file__).resolve().parent / "node_call.js"


def functions():
    """Every example function: appfs/<name>-<runtime>/ directories."""
    found = []
    for d in sorted(APPFS.iterdir()):
        if d.is_dir() and d.name not in ("tests", "__pycache__") and "-" in d.name:
            found.append(d.name)
    return found


def runtime_of(name):
    return name.rsplit("-", 1)[1]


def requests(name):
    """The requests of resources/requests/<name>.json, one per line."""
    lines = (REQUESTS / f"{name}.json").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


_modules = {}


def load(name):
    """Imports appfs/<name>/workload.py the way the python3 agent does (its
    directory is the working directory and first on sys.path); returns the
    module. Cached: each function is loaded once per run, as in a VM."""
    if name not in _modules:
        appdir = APPFS / name
        spec = importlib.util.spec_from_file_location(f"workload_{name.replace('-', '_')}",
                                                      appdir / "workload.py")
        module = importlib.util.module_from_spec(spec)
        cwd = os.getcwd()
        sys.path.insert(0, str(appdir))
        try:
            os.chdir(appdir)
            spec.loader.exec_module(module)
        finally:
            os.chdir(cwd)
            sys.path.remove(str(appdir))
        _modules[name] = module
    return _modules[name]


_agent = None


def agent_module():
    """rootfs/python3/agent.py, the guest agent itself."""
    global _agent
    if _agent is None:
        spec = importlib.util.spec_from_file_location("snapvm_agent",
                                                      REPO / "rootfs" / "python3" / "agent.py")
        _agent = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_agent)
    return _agent


def through_agent(name, request):
    """What the guest would send back for `request`: the agent's own
    Agent.call (error handling, dict check, strict JSON encoding, size
    limit) around the function's handle; returns the decoded response."""
    agent = agent_module()
    a = agent.Agent(agent.Config({}), ops=None)
    a.handle = load(name).handle
    with contextlib.redirect_stderr(io.StringIO()):  # the agent's tracebacks
        return json.loads(a.call(request))


def node():
    return shutil.which("node") or shutil.which("nodejs")


def node_call(name, reqs):
    """Calls appfs/<name>/workload.js's handle with each request in a
    fresh node; returns the list of {"ok": result} / {"error": message}."""
    exe = node()
    if exe is None:
        raise RuntimeError("node is not installed (scripts/appfs-test.sh installs it)")
    proc = subprocess.run([exe, str(NODE_CALL), str(APPFS / name / "workload.js")],
                          input=json.dumps(reqs).encode(), capture_output=True, timeout=30,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"node failed ({proc.returncode}): {proc.stderr.decode()}")
    return json.loads(proc.stdout)
