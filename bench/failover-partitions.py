#!/usr/bin/env python3
"""Failover of many partitions (issue 12), on 3 real chatd processes on loopback.

    bench/failover-partitions.py PARTITIONS [ACTIVE] [--runs N]

Starts a 3-node cluster with PARTITIONS partitions (R=3), waits until every group is
quiesced, wakes ACTIVE of the partitions led by the node that leads the most (a record
appended to each; default a tenth), starts a writer appending to one of those through
another node, and kill -9s that node. Then it polls both survivors' view of every group
(`GET /v1/admin/leaders`, paged, every 20 ms) until each group the dead node led has a
live leader both agree on, and prints how long that took (all, active, quiesced), and
the writer's longest append (send -> ack) meanwhile. Everything it starts is stopped by
PID and its directory removed on exit.

CHATD_BIN picks the binary (default $CARGO_TARGET_DIR/debug/chatd or target/debug/chatd).
LIVENESS_PING_MS / LIVENESS_TIMEOUT_MS override the nodes' [raft] liveness knobs.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

POLL_S = 0.02
READY_WAIT_S = 180


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    runs = 1
    if "--runs" in sys.argv:
        runs = int(sys.argv[sys.argv.index("--runs") + 1])
        args = [a for a in args if a != str(runs)]
    if not args:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    partitions = int(args[0])
    active = int(args[1]) if len(args) > 1 else None
    binary = os.environ.get("CHATD_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "chatd"
    )
    for run in range(runs):
        one_run(binary, partitions, active, run)


def one_run(binary, partitions, active, run):
    d = tempfile.mkdtemp(prefix="chatd-failover.")
    port = 20000 + random.randrange(400) * 100
    procs = {}
    try:
        subprocess.run(
            [binary, "cluster", "init", "--nodes", "3", "--partitions", str(partitions),
             "--base-port", str(port), "--out", f"{d}/c"],
            check=True, stdout=subprocess.DEVNULL,
        )
        token = open(f"{d}/c/admin.token").read().strip()
        for key in ("liveness_ping_ms", "liveness_timeout_ms"):
            value = os.environ.get(key.upper())
            if value:
                for i in (1, 2, 3):
                    path = f"{d}/c/node-{i}/chatd.toml"
                    lines = open(path).read().splitlines()
                    lines = [f"{key} = {int(value)}" if ln.startswith(f"{key} = ") else ln
                             for ln in lines]
                    open(path, "w").write("\n".join(lines) + "\n")
        for i in (1, 2, 3):
            procs[i] = subprocess.Popen(
                [binary, "run", "--config", f"{d}/c/node-{i}/chatd.toml"],
                stdout=subprocess.DEVNULL, stderr=open(f"{d}/node-{i}.log", "w"),
            )

        def url(i, path):
            return f"http://127.0.0.1:{port + 10 * (i - 1)}{path}"

        def call(i, path, body=None, timeout=10):
            req = urllib.request.Request(
                url(i, path), data=body, headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)

        def leaders(i):
            out, after = {}, None
            while True:
                q = "/v1/admin/leaders" + (f"?after={after}" if after is not None else "")
                page = call(i, q)
                for g, leader, term, quiet in page["groups"]:
                    out[g] = (leader, term, quiet)
                after = page["next_after"]
                if after is None:
                    return out

        start = time.time()
        for i in (1, 2, 3):
            while True:
                try:
                    urllib.request.urlopen(url(i, "/readyz"), timeout=2)
                    break
                except (urllib.error.URLError, OSError):
                    if time.time() - start > READY_WAIT_S:
                        sys.exit(f"node {i} not ready")
                    time.sleep(0.5)
        while True:
            views = {i: leaders(i) for i in (1, 2, 3)}
            if all(all(q for (_, _, q) in v.values()) for v in views.values()):
                break
            if time.time() - start > READY_WAIT_S + 60:
                sys.exit("groups did not all quiesce")
            time.sleep(0.5)
        quiet_after = time.time() - start
        counts = {i: sum(1 for (l, _, _) in views[i].values() if l == i) for i in (1, 2, 3)}
        victim = max(counts, key=counts.get)
        led = sorted(g for g, (l, _, _) in views[victim].items() if l == victim)
        survivors = [i for i in (1, 2, 3) if i != victim]
        n_active = len(led) // 10 if active is None else min(active, len(led))
        woken = [g for g in led if g != 0][:n_active]
        for g in woken:
            call(victim, f"/v1/admin/partitions/{g}/records", body=b"wake")

        # A writer on one woken partition, through a survivor (forwarded to the leader).
        latencies, stop = [], threading.Event()

        def writer():
            g = woken[0]
            while not stop.is_set():
                t = time.time()
                try:
                    call(survivors[0], f"/v1/admin/partitions/{g}/records", body=b"w", timeout=15)
                    latencies.append(time.time() - t)
                except (urllib.error.URLError, OSError):
                    latencies.append(time.time() - t)
                time.sleep(0.005)

        w = threading.Thread(target=writer) if woken else None
        if w:
            w.start()
            time.sleep(1.0)
        before_kill = len(latencies)
        procs[victim].kill()
        t0 = time.time()
        procs[victim].wait()
        first_led = {}
        while len(first_led) < len(led) and time.time() - t0 < 30:
            views = {i: leaders(i) for i in survivors}
            now = time.time() - t0
            for g in led:
                if g in first_led:
                    continue
                ls = {views[i].get(g, (None, 0, False))[0] for i in survivors}
                if len(ls) == 1 and None not in ls and victim not in ls:
                    first_led[g] = now
            time.sleep(POLL_S)
        if w:
            time.sleep(1.0)
            stop.set()
            w.join()
        missing = [g for g in led if g not in first_led]
        act = [first_led[g] for g in woken if g in first_led]
        qui = [first_led[g] for g in led if g not in woken and g in first_led]
        during = latencies[before_kill:]
        print(
            f"run {run + 1}: {partitions} partitions, quiet after {quiet_after:.0f} s; "
            f"killed node {victim} leading {len(led)} groups ({len(woken)} active, "
            f"{len(led) - len(woken)} quiesced)"
        )
        if missing:
            print(f"  NOT re-led within 30 s: {missing[:10]}{'...' if len(missing) > 10 else ''}")
        print(
            f"  every group re-led after {max(first_led.values()):.3f} s "
            f"(active: max {max(act, default=0):.3f} s; quiesced: median "
            f"{sorted(qui)[len(qui) // 2] if qui else 0:.3f} s, max {max(qui, default=0):.3f} s)"
        )
        if during:
            print(
                f"  writer on partition {woken[0]}: {len(during)} appends after the kill, "
                f"longest send -> ack {max(during):.3f} s"
            )
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
