"""A hostile soak of `taipan serve`: many clients for a bounded time, on loopback only, mixing
ordinary traffic (plain, streamed, n > 1, tools, JSON mode, completions with logprobs) with
hostile traffic (disconnects during prefill and mid-stream, malformed JSON, wrong types, huge
bodies, slowloris senders, invalid UTF-8, unknown routes, wrong keys).

It checks what must hold whatever the clients do, and reports:
  - requests by scenario and outcome;
  - 5xx answers (none allowed: no fault is injected here), crashes, hangs (a request that does
    not finish within its deadline), malformed streams (every stream ends with `[DONE]`, after
    data chunks or an error chunk) and wrong answers (a JSON-mode answer that is not JSON);
  - the server's RSS after warm-up and at the end (within 5%), and its running-sequence count
    after the load stops (back to 0).
Exit status 0 only if every check held.

Usage: bench/soak.py MODEL [--clients 32] [--minutes 10] [--max-tokens 24] [-- extra serve args]
"""
import argparse, collections, json, os, random, socket, sys, threading, time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import Server  # noqa: E402

KEY = "soak-key-5b1e"
MODEL = "jamba-mini"
USER = [{"role": "user", "content": "Tell me about rivers."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
LONG = "The river carries water from the hills to the sea, and along the way it shapes the land. " * 60


class Violation(Exception):
    pass


class Client:
    def __init__(self, port, max_tokens, rng):
        self.port, self.max_tokens, self.rng = port, max_tokens, rng

    def conn(self, timeout=300):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, key=KEY, raw=None, timeout=300):
        c = self.conn(timeout)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        payload = r.read()
        c.close()
        if r.status >= 500:
            raise Violation(f"{method} {path}: {r.status} {payload[:200]!r}")
        return r.status, payload

    def tokens(self):
        return self.rng.randint(1, self.max_tokens)

    def check_stream(self, status, payload):
        if status != 200:
            return str(status)
        events = [line for line in payload.decode().split("\n") if line]
        if not events or events[-1] != "data: [DONE]":
            raise Violation(f"stream does not end with [DONE]: {events[-3:]}")
        for e in events[:-1]:
            if not e.startswith("data: "):
                raise Violation(f"non-data line in a stream: {e!r}")
            chunk = json.loads(e[6:])
            if "error" in chunk:
                raise Violation(f"stream error chunk: {chunk}")
        return "200 stream"

    # --- ordinary traffic ---
    def chat_ai21(self):
        s, p = self.request("POST", "/studio/v1/chat/completions",
                            {"model": MODEL, "messages": USER, "max_tokens": self.tokens(), "temperature": 0.4})
        if s == 200:
            assert json.loads(p)["choices"][0]["message"]["role"] == "assistant"
        return str(s)

    def chat_stream(self):
        return self.check_stream(*self.request("POST", "/v1/chat/completions", {
            "model": MODEL, "messages": USER, "max_tokens": self.tokens(), "stream": True,
            "stream_options": {"include_usage": True}}))

    def ai21_stream(self):
        return self.check_stream(*self.request("POST", "/studio/v1/chat/completions", {
            "model": MODEL, "messages": USER, "max_tokens": self.tokens(), "stream": True}))

    def n_choices(self):
        s, p = self.request("POST", "/v1/chat/completions", {
            "model": MODEL, "messages": USER, "max_tokens": self.tokens(), "n": 3, "temperature": 0.9, "seed": 5})
        if s == 200 and len(json.loads(p)["choices"]) != 3:
            raise Violation("n=3 did not give 3 choices")
        return str(s)

    def tools(self):
        choice = self.rng.choice(["auto", "required"])
        s, p = self.request("POST", "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
            "tool_choice": choice, "max_tokens": 64})
        if s == 200 and choice == "required":
            c = json.loads(p)["choices"][0]
            if c["finish_reason"] == "tool_calls":
                json.loads(c["message"]["tool_calls"][0]["function"]["arguments"])
        return str(s)

    def json_mode(self):
        s, p = self.request("POST", "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "A JSON object about a cat."}],
            "response_format": {"type": "json_object"}, "max_tokens": 96})
        if s == 200:
            c = json.loads(p)["choices"][0]
            if c["finish_reason"] == "stop":
                try:
                    json.loads(c["message"]["content"])
                except ValueError:
                    raise Violation(f"JSON mode answered non-JSON: {c['message']['content']!r}")
        return str(s)

    def completions(self):
        s, p = self.request("POST", "/v1/completions", {
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": self.tokens(), "logprobs": 2, "echo": True})
        return str(s)

    def reads(self):
        path = self.rng.choice(["/health", "/metrics", "/v1/models", "/studio/v1/models"])
        return str(self.request("GET", path)[0])

    # --- hostile traffic ---
    def raw_post(self, path, body, key=KEY):
        # As long a deadline as the other requests get: under load a stream may wait in the queue.
        s = socket.create_connection(("127.0.0.1", self.port), timeout=300)
        head = (f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        s.sendall(head + body)
        return s

    def leave_during_prefill(self):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 8,
                           "stream": self.rng.random() < 0.5}).encode()
        s = self.raw_post("/v1/chat/completions", body)
        time.sleep(self.rng.uniform(0.05, 0.5))
        s.close()
        return "left"

    def leave_mid_stream(self):
        s = self.raw_post("/v1/chat/completions", json.dumps({
            "model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode())
        got = b""
        while got.count(b"data: ") < 3:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and not got.startswith(b"HTTP/1.1 200"):
                break  # refused (a 429 under load): the connection stays open for the next request
        s.close()
        status = got[9:12].decode(errors="replace")
        if status.startswith("5"):
            raise Violation(f"mid-stream request answered {status}")
        return "left" if status == "200" else status

    def malformed_json(self):
        return str(self.request("POST", "/v1/chat/completions", raw=b'{"model": "m", "messages": [')[0])

    def wrong_types(self):
        body = self.rng.choice([{"model": MODEL, "messages": 5}, {"model": MODEL, "messages": USER, "n": "two"},
                                {"model": MODEL, "messages": USER, "temperature": [1]}, [1, 2, 3], "text"])
        path = self.rng.choice(["/v1/chat/completions", "/studio/v1/chat/completions", "/v1/completions"])
        return str(self.request("POST", path, body)[0])

    def huge_body(self):
        raw = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (11 << 20) + b'"}]}'
        try:
            return str(self.request("POST", "/v1/chat/completions", raw=raw, timeout=60)[0])
        except (BrokenPipeError, ConnectionResetError):
            return "reset after limit"

    def slowloris(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {KEY}\r\n"
        try:
            for ch in head:
                s.send(ch.encode())
                time.sleep(0.05)
        except OSError:
            return "closed by server"
        finally:
            s.close()
        return "dripped"

    def invalid_utf8(self):
        raw = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}'
        return str(self.request("POST", "/v1/chat/completions", raw=raw)[0])

    def unknown_route(self):
        return str(self.request(self.rng.choice(["GET", "POST"]), self.rng.choice(["/v2/chat", "/studio/v1/x", "/"]))[0])

    def wrong_key(self):
        return str(self.request("POST", "/studio/v1/chat/completions", {"model": MODEL, "messages": USER},
                                key=self.rng.choice(["nope", "", "soak-key-5b1f"]))[0])


SCENARIOS = [  # name, weight
    ("chat_ai21", 6), ("chat_stream", 6), ("ai21_stream", 4), ("n_choices", 2), ("tools", 2), ("json_mode", 2),
    ("completions", 2), ("reads", 2), ("leave_during_prefill", 2), ("leave_mid_stream", 2), ("malformed_json", 2),
    ("wrong_types", 2), ("huge_body", 1), ("slowloris", 1), ("invalid_utf8", 1), ("unknown_route", 1),
    ("wrong_key", 1),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    a, serve_args = ap.parse_known_args()
    a.serve_args = [x for x in serve_args if x != "--"]

    srv = Server("-m", a.model, "--api-key", KEY, "--max-queue", "24", *a.serve_args)
    try:
        soak(a, srv)
    finally:
        srv.stop()


def running_sequences(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = c.getresponse().read().decode()
    c.close()
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("taipan_running_sequences "))))


def soak(a, srv):
    outcomes = collections.Counter()
    violations = []
    lock = threading.Lock()
    names = [n for n, w in SCENARIOS for _ in range(w)]
    stop_at = [0.0]

    def worker(i):
        rng = random.Random(a.seed * 1000 + i)
        c = Client(srv.port, a.max_tokens, rng)
        while time.time() < stop_at[0]:
            name = rng.choice(names)
            try:
                outcome = getattr(c, name)()
            except Violation as e:
                outcome = "VIOLATION"
                with lock:
                    violations.append(f"{name}: {e}")
            except (socket.timeout, TimeoutError):
                outcome = "HANG"
                with lock:
                    violations.append(f"{name}: no answer within the deadline")
            except Exception as e:  # a connection refused or reset is a crash unless the scenario expects it
                outcome = f"EXC {type(e).__name__}"
                with lock:
                    violations.append(f"{name}: {type(e).__name__}: {e}")
            with lock:
                outcomes[(name, outcome)] += 1

    def run(minutes, clients):
        stop_at[0] = time.time() + minutes * 60
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=minutes * 60 + 600)
            if t.is_alive():
                violations.append("a client thread never finished (hang)")

    t0 = time.time()
    run(min(1.0, a.minutes / 5), a.clients)  # warm-up: pools, grammar index, caches touched
    rss_warm = srv.rss_mb()
    warm_counts = sum(outcomes.values())
    run(a.minutes, a.clients)
    time.sleep(2)
    rss_end = srv.rss_mb()
    deadline = time.time() + 60
    while running_sequences(srv.port) != 0 and time.time() < deadline:
        time.sleep(0.5)
    running = running_sequences(srv.port)
    alive = srv.proc.poll() is None

    total = sum(outcomes.values())
    print(f"model {os.path.basename(a.model)}: {a.clients} clients, {a.minutes} min (+ warm-up), "
          f"{total} requests ({total - warm_counts} after warm-up), {time.time() - t0:.0f} s")
    by_scenario = collections.defaultdict(dict)
    for (name, outcome), n in sorted(outcomes.items()):
        by_scenario[name][outcome] = n
    for name, _ in SCENARIOS:
        print(f"  {name:22s} " + ", ".join(f"{o}: {n}" for o, n in sorted(by_scenario.get(name, {}).items())))
    fivexx = sum(n for (_, o), n in outcomes.items() if o.startswith("5"))
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(f"5xx: {fivexx}; violations: {len(violations)}; server alive at the end: {alive}")
    print(f"RSS after warm-up {rss_warm:.1f} MB, at the end {rss_end:.1f} MB ({growth:+.1f}%); "
          f"running sequences after the load: {running}")
    for v in violations[:20]:
        print("  VIOLATION", v)
    ok = not violations and fivexx == 0 and alive and abs(growth) <= 5 and running == 0
    print("SOAK", "PASSED" if ok else "FAILED")
    if not ok:
        srv.stop()
        sys.exit(1)


if __name__ == "__main__":
    main()
