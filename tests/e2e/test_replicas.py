"""Three taipan replicas on loopback behind a real load balancer (HAProxy, Debian's package;
scripts/e2e.sh installs it): health checks on /health, least connections. Driven by the official
SDKs: requests spread over every replica; a replica killed mid-run leaves the rotation and no
request sent after the balancer noticed fails; a replica still loading (its /health answers 503)
receives nothing until it is ready."""
import re
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest
from ai21 import AI21Client
from ai21.models.chat import ChatMessage

from conftest import ROOT, Server, free_port

CHECK_MS = 200  # health-check interval; a replica is down after 2 failures, up after 2 passes


def haproxy_config(port, stats_port, replicas):
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{r.port} check inter {CHECK_MS} fall 2 rise 2" for i, r in enumerate(replicas))
    return f"""global
    log stderr format raw local0 warning
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend api
    bind 127.0.0.1:{port}
    default_backend taipan
frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
backend taipan
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


def finished(replica):
    """Requests the replica answered (its own counter)."""
    text = httpx.get(replica.base + "/metrics", timeout=10).text
    return int(float(re.search(r"^taipan_requests_finished_total (\S+)", text, re.M).group(1)))


def server_states(stats_port):
    """HAProxy's view: server name → UP/DOWN, from its CSV stats."""
    try:
        csv = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).text
    except httpx.HTTPError:
        return {}  # not listening yet
    out = {}
    for line in csv.splitlines()[1:]:
        f = line.split(",")
        if len(f) > 17 and f[0] == "taipan" and f[1] not in ("BACKEND", "FRONTEND"):
            out[f[1]] = f[17]
    return out


def wait_for(predicate, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert shutil.which(haproxy), "haproxy is not installed (scripts/e2e.sh installs Debian's package)"
    replicas = [Server(threads=1) for _ in range(3)]
    # A fourth replica that stays loading for 8 s (test-only delay, fault injection on).
    loading = Server(threads=1, wait=False,
                     env={"TAIPAN_FAULT_INJECTION": "1", "TAIPAN_FAULT_LOAD_DELAY_MS": "8000"})
    cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    log = open(ROOT / "target" / "e2e-haproxy.log", "w")
    # A port free_port() found can be taken (by any client's ephemeral port) before HAProxy
    # binds it; HAProxy then exits at once: pick new ports and start it again.
    for _ in range(5):
        port, stats_port = free_port(), free_port()
        cfg.write_text(haproxy_config(port, stats_port, replicas + [loading]))
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        try:
            lb.wait(timeout=1)
        except subprocess.TimeoutExpired:
            break  # still running: it bound its ports
    try:
        ready = {f"r{i}": "UP" for i in range(3)} | {"r3": "DOWN"}
        assert wait_for(lambda: server_states(stats_port) == ready), server_states(stats_port)
        yield {"base": f"http://127.0.0.1:{port}", "stats": stats_port, "replicas": replicas, "loading": loading}
    finally:
        lb.terminate()
        lb.wait(timeout=10)
        for r in replicas + [loading]:
            r.stop()


def test_balancer_spreads_skips_loading_and_drops_a_dead_replica(cluster):
    base, stats, replicas, loading = cluster["base"], cluster["stats"], cluster["replicas"], cluster["loading"]
    oa = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    ai21 = AI21Client(api_key="none", api_host=base + "/studio/v1")

    # The loading replica is down for the balancer (its /health answers 503).
    assert httpx.get(loading.base + "/health").status_code == 503
    assert server_states(stats)["r3"] == "DOWN"

    # Concurrent requests through both SDKs spread over all three ready replicas.
    before = [finished(r) for r in replicas]
    errors = []

    def ask(i):
        try:
            if i % 2:
                r = oa.completions.create(model="jamba-mini", prompt=f"Count to {i}:", max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
                assert r.usage.completion_tokens == 24
            else:
                r = ai21.chat.completions.create(model="jamba-mini", max_tokens=24,
                                                 messages=[ChatMessage(role="user", content=f"Say {i}")])
                assert r.choices[0].message.content is not None
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    served = [finished(r) - b for r, b in zip(replicas, before)]
    assert sum(served) == 12 and all(s > 0 for s in served), served

    # Kill replica 1 while a batch is in flight. Requests it held may fail; once the balancer has
    # marked it down, every new request succeeds on the other two.
    long_running = [threading.Thread(target=ask, args=(100 + i,)) for i in range(6)]
    for t in long_running:
        t.start()
    time.sleep(0.3)
    replicas[1].proc.kill()
    for t in long_running:
        t.join()
    assert wait_for(lambda: server_states(stats)["r1"] == "DOWN", timeout=10), server_states(stats)
    errors.clear()
    alive = [replicas[0], replicas[2]]
    before = [finished(r) for r in alive]
    threads = [threading.Thread(target=ask, args=(200 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(finished(r) - b for r, b in zip(alive, before)) == 8

    # The loading replica got nothing while loading; once ready, the balancer adds it.
    assert finished_or_none(loading) in (None, 0)
    loading.wait_ready()
    assert wait_for(lambda: server_states(stats)["r3"] == "UP", timeout=10), server_states(stats)
    assert finished(loading) == 0  # nothing reached it while it loaded


def finished_or_none(replica):
    try:
        return finished(replica)
    except (httpx.HTTPError, AttributeError):
        return None
