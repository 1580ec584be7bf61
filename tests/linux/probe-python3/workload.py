"""probe (python3): what the Linux end-to-end tests (tests/linux.rs) ask a
real guest about itself: randomness (kernel and Python), the wall clock,
the CPUs it runs on, what its kernel made of our virtio disks, and how
many requests this process has served (module state that a hibernated
VM must keep)."""

import os
import random
import time


def disk(name):
    base = f"/sys/block/{name}"
    with open(f"{base}/ro") as f:
        ro = f.read().strip() == "1"
    with open(f"{base}/size") as f:
        sectors = int(f.read())
    try:
        with open(f"/dev/{name}", "r+b", buffering=0) as dev:
            dev.write(b"\0")
        write = "written"
    except OSError as e:
        write = f"refused: {e.strerror}"
    return {"ro": ro, "sectors": sectors, "write": write}


served = 0


def handle(request):
    global served
    served += 1
    with open("/sys/devices/system/cpu/online") as f:
        online = f.read().strip()
    return {
        "urandom": os.urandom(16).hex(),
        "random": random.random(),
        "time_ns": time.time_ns(),
        "cpus": len(os.sched_getaffinity(0)),
        "online": online,
        "vda": disk("vda"),
        "vdb": disk("vdb"),
        "served": served,
    }
