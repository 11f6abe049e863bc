"""End to end: a real `taipan serve` on the default model, driven by the official ai21 and openai
SDKs and by raw HTTP."""
import json
import re
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest
from ai21 import AI21Client
from ai21.models.chat import ChatMessage

from conftest import BIN, KEY, Server, free_port

SEED_BODY = """{
		"model": "jamba-1.5-large",
		"messages": [
			{
				"role": "system",
				"content": "You are an assistant for the company Coca Cola"
			},
			{
				"role": "user",
				"content": "allo"
			},
			{
				"role": "assistant",
				"content": "Hello! How can I assist you today?"
			},
			{
				"role": "user",
				"content": "what is Coca Cola"
			}
		],
		"documents": [],
		"tools": [],
		"n": 1,
		"max_tokens": 2048,
		"temperature": 0.4,
		"top_p": 1,
		"stop": [],
		"stream": false
	}"""

USER = [{"role": "user", "content": "What is the capital of France?"}]


def ai21_client(server):
    return AI21Client(api_key=KEY, api_host=server.base + "/studio/v1")


def openai_client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.base + "/v1", max_retries=0)


def sse_events(resp):
    """Parses an SSE body strictly as the AI21 SDK does: only `data: ` lines and blank lines."""
    events = []
    for line in resp.text.split("\n"):
        if line == "":
            continue
        assert line.startswith("data: "), f"non-data line in stream: {line!r}"
        events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_seed_request_byte_for_byte(server):
    r = httpx.post(server.base + "/studio/v1/chat/completions", content=SEED_BODY.encode(),
                   headers={"Content-type": "application/json", "Authorization": f"Bearer {KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["id", "choices", "usage"]
    assert re.fullmatch(r"chat-[0-9a-f]{32}", body["id"])
    (choice,) = body["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and "tool_calls" in choice["message"]
    assert choice["message"]["tool_calls"] is None
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 30


def test_ai21_sdk_stream_reassembles_to_the_non_streamed_answer(server):
    client = ai21_client(server)
    messages = [ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Name a colour.")]
    full = client.chat.completions.create(model="jamba-mini", messages=messages, temperature=0, max_tokens=40)
    assert full.choices[0].message.role == "assistant"
    text = full.choices[0].message.content
    assert text
    parts, last = [], None
    for chunk in client.chat.completions.create(model="jamba-mini", messages=messages, temperature=0,
                                                  max_tokens=40, stream=True):
        last = chunk
        if chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == text
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_ai21_raw_stream_format(http):
    r = http.post("/studio/v1/chat/completions", json={"model": "jamba-mini", "messages": USER, "max_tokens": 5,
                                                        "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert ": " in r.text.split("\n")[0][6:], "AI21 stream JSON uses Python separators"
    events = sse_events(r)
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all("usage" not in e for e in events[:-1])
    final = events[-1]
    assert final["choices"][0]["delta"] == {"content": ""} and final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 5


def test_max_tokens_gives_length_and_exact_count(http):
    body = http.post("/studio/v1/chat/completions", json={"model": "jamba-mini", "messages": USER, "max_tokens": 3,
                                                         "ignore_eos": True}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_stop_strings_cut_and_are_not_emitted(http):
    base = {"model": "jamba-mini", "messages": USER, "temperature": 0, "max_tokens": 30}
    text = http.post("/studio/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 4]
    want = text[:text.index(stop)]
    stopped = http.post("/studio/v1/chat/completions", json={**base, "stop": ["never-there", stop]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == want
    r = http.post("/studio/v1/chat/completions", json={**base, "stop": stop, "stream": True})
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r))
    assert streamed == want


def test_openai_sdk_chat_stream_n_and_usage(server):
    client = openai_client(server)
    full = client.chat.completions.create(model="jamba-mini", messages=USER, temperature=0, max_tokens=20)
    assert full.object == "chat.completion" and full.model == "jamba-mini"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    text = full.choices[0].message.content
    stream = client.chat.completions.create(model="jamba-mini", messages=USER, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    assert "".join(parts) == text
    assert usage.completion_tokens == full.usage.completion_tokens
    three = client.chat.completions.create(model="jamba-mini", messages=USER, temperature=1.0, max_tokens=8, n=3, seed=5,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24
    again = client.chat.completions.create(model="jamba-mini", messages=USER, temperature=1.0, max_tokens=8, n=3, seed=5,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]


def test_openai_logprobs(server):
    client = openai_client(server)
    r = client.chat.completions.create(model="jamba-mini", messages=USER, temperature=0, max_tokens=4,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        # Greedy: the chosen token is the most likely one.
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5


def test_legacy_completions_text_tokens_logprobs_echo(server, http):
    client = openai_client(server)
    r = client.completions.create(model="jamba-mini", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    r2 = client.completions.create(model="jamba-mini", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    r3 = client.completions.create(model="jamba-mini", prompt="The capital of France is", max_tokens=2, temperature=0,
                                   logprobs=2, echo=True)
    lp = r3.choices[0].logprobs
    assert r3.choices[0].text.startswith("The capital of France is")
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0
    parts = [c.choices[0].text for c in client.completions.create(model="jamba-mini", prompt="The capital of France is",
                                                                  max_tokens=5, temperature=0, stream=True)]
    assert "".join(parts) == r.choices[0].text


def test_tokenize_detokenize_models_metrics(http):
    t = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == [19556, 905] and t["count"] == 2 and t["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": [19556, 905]}).json()["prompt"] == "Hello world"
    models = http.get("/v1/models").json()
    names = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and "jamba-large" in names and "SmolLM2-135M-Instruct.Q4_1" in names
    assert all(m["object"] == "model" for m in models["data"])
    ai21_models = http.get("/studio/v1/models").json()["data"]
    assert {"id", "name", "context_length", "max_completion_tokens", "pricing"} <= set(ai21_models[0])
    metrics = http.get("/metrics").text
    assert "taipan_generated_tokens_total" in metrics and "taipan_queue_length" in metrics


def test_sloppy_base_urls_still_route(http):
    r = http.post("/studio/v1//chat/completions/", json={"model": "jamba-mini", "messages": USER, "max_tokens": 2})
    assert r.status_code == 200


AI21_ERRORS = [
    (b'{"model": "jamba-mini", "messages": [', "body"),
    (b'{"model": "jamba-mini", "messages": []}', "messages"),
    (b'{"model": "jamba-mini", "messages": "hi"}', "messages"),
    (b'{"model": "jamba-mini", "messages": [{"role": "robot", "content": "x"}]}', "role"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "temperature": 5}', "temperature"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "temperature": "warm"}', "temperature"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}', "max_tokens"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"model": "jamba-mini", "messages": [{"role": "user", "content": "x"}], "n": 2, "stream": true}', "n"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', "model"),
]


@pytest.mark.parametrize("body,field", AI21_ERRORS)
def test_ai21_validation_errors_name_the_field(http, body, field):
    r = http.post("/studio/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert field in detail[0]["loc"], detail


@pytest.mark.parametrize("body,field", AI21_ERRORS[:-1])
def test_openai_validation_errors_are_400_with_param(http, body, field):
    if field == "max_tokens" or b'"stream": true' in body:
        pytest.skip("allowed in the OpenAI dialect")
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and field in (err["param"] or "") + err["message"]


def test_openai_unknown_model_is_404_and_sdk_raises(server):
    with pytest.raises(openai.NotFoundError) as e:
        openai_client(server).chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_prompt_longer_than_context(http):
    long = "word " * 9000
    r = http.post("/studio/v1/chat/completions", json={"model": "jamba-mini", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 422 and "context" in r.text
    r = http.post("/v1/chat/completions", json={"model": "jamba-mini", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_body_too_large_and_unknown_route(http):
    r = http.post("/v1/chat/completions", content=b"x" * (11 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/json")
    # The unread body ends the connection; the response says so, so the client opens a new one.
    assert r.headers.get("connection") == "close"
    r = http.get("/studio/v1/library/files")
    assert r.status_code == 404 and "detail" in r.json()


def test_auth_required_when_keys_are_configured(server):
    url = server.base + "/studio/v1/chat/completions"
    body = {"model": "jamba-mini", "messages": USER, "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "detail" in r.json()
    r = httpx.post(server.base + "/v1/chat/completions", json=body, headers={"Authorization": "Token " + KEY})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=body, headers={"api-key": KEY}).status_code == 200
    assert httpx.get(server.base + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=server.base + "/v1", max_retries=0).models.list()


def test_auth_off_without_keys(open_server):
    r = httpx.post(open_server.base + "/v1/chat/completions",
                   json={"model": "jamba-mini", "messages": USER, "max_tokens": 2})
    assert r.status_code == 200
    client = AI21Client(api_key="anything", api_host=open_server.base + "/studio/v1")
    assert client.chat.completions.create(model="jamba-mini", messages=[ChatMessage(role="user", content="hi")],
                                          max_tokens=2).choices


def test_disconnect_mid_stream_frees_the_engine(server, http):
    before = int(re.search(r"taipan_requests_cancelled_total (\d+)", http.get("/metrics").text).group(1))
    body = {"model": "jamba-mini", "messages": USER, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    t = time.time()
    r = http.post("/v1/chat/completions", json={"model": "jamba-mini", "messages": USER, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    # The abandoned 4000-token stream would take well over a minute; the new request did not wait for it.
    assert time.time() - t < 20
    after = int(re.search(r"taipan_requests_cancelled_total (\d+)", http.get("/metrics").text).group(1))
    assert after == before + 1


def test_disconnect_during_a_long_prefill_cancels_at_once():
    # 8 prompt tokens a step: this ~6,000-token prompt takes about a minute to prefill. A client
    # that leaves before the first token (streamed or not) must free the engine within moments.
    s = Server("--max-batch-tokens", "8")
    try:
        def metric(name):
            return int(float(re.search(rf"^{name} (\S+)", httpx.get(s.base + "/metrics").text, re.M).group(1)))

        for k, stream in enumerate((True, False)):
            body = json.dumps({"model": "jamba-mini", "messages": [{"role": "user", "content": "word " * 6000}],
                               "max_tokens": 4, "stream": stream}).encode()
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.time() + 30
            while metric("taipan_running_sequences") == 0:
                assert time.time() < deadline, "the request never started"
                time.sleep(0.05)
            time.sleep(1.0)
            assert metric("taipan_running_sequences") == 1, "still prefilling"
            sock.close()
            t = time.time()
            while metric("taipan_running_sequences") != 0:
                assert time.time() - t < 5, f"stream={stream}: the engine kept prefilling for a client that left"
                time.sleep(0.05)
            assert metric("taipan_requests_cancelled_total") == k + 1
    finally:
        assert s.stop() == 0


def _in_flight_during_sigterm(s, max_tokens):
    """One streamed and one plain request running when SIGTERM arrives; returns their outcomes."""
    import concurrent.futures
    body = {"model": "jamba-mini", "messages": USER, "max_tokens": max_tokens, "ignore_eos": True}

    def streamed():
        r = httpx.post(s.base + "/v1/chat/completions", json={**body, "stream": True}, timeout=120)
        return [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]

    def plain():
        return httpx.post(s.base + "/v1/chat/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        events, answer = pool.submit(streamed), pool.submit(plain)
        time.sleep(1.5)
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(timeout=60)
        return events.result(), answer.result(), code


def test_graceful_shutdown_lets_requests_finish_within_the_grace_and_exits_zero():
    s = Server("--shutdown-grace", "60")
    events, answer, code = _in_flight_during_sigterm(s, 300)
    assert code == 0
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 300


def test_a_shutdown_that_cuts_requests_tells_each_client_and_exits_non_zero():
    s = Server("--shutdown-grace", "1")
    events, answer, code = _in_flight_during_sigterm(s, 4000)
    assert code == 75, "cut requests make the exit non-zero (EX_TEMPFAIL)"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "the server is shutting down"
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    log = open(s.log.name).read()
    assert "2 requests were cut by the shutdown" in log


def test_tools_documents_and_tool_messages_are_accepted(server):
    from ai21.models.chat import AssistantMessage, ToolMessage, UserMessage
    from ai21.models.chat.document_schema import DocumentSchema
    client = ai21_client(server)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        UserMessage(content="What is the weather in Paris?"),
        AssistantMessage(content=None, tool_calls=[{"id": "call_1", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
        ToolMessage(content="18 C", tool_call_id="call_1"),
    ]
    r = client.chat.completions.create(model="jamba-mini", messages=messages, tools=tools, max_tokens=8,
                                       documents=[DocumentSchema(content="Paris is in France.", metadata={"topic": "geo"})],
                                       response_format={"type": "text"})
    assert r.choices[0].message.role == "assistant"
    bad = httpx.post(server.base + "/studio/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "jamba-mini", "messages": USER, "tools": [{"type": "retrieval"}]})
    assert bad.status_code == 422 and "tools" in bad.json()["detail"][0]["loc"]


def test_full_queue_answers_429_with_retry_after():
    import concurrent.futures
    s = Server("--max-queue", "1")
    try:
        body = {"model": "jamba-mini", "messages": USER, "max_tokens": 64, "ignore_eos": True}

        def call(_):
            r = httpx.post(s.base + "/v1/chat/completions", json=body, timeout=120)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        for code, retry, body in results:
            if code == 429:
                assert retry is not None and body["error"]["type"] == "rate_limit_error"
    finally:
        assert s.stop() == 0


def test_usable_context_is_what_the_cache_budget_holds():
    # SmolLM2 keeps 30 layers x 192 floats x K and V = 46,080 bytes per position: 8 MiB holds 11
    # blocks of 16 positions. The budget is not raised; the usable context shrinks and says so.
    s = Server("--kv-cache-mb", "8")
    try:
        models = httpx.get(s.base + "/v1/models").json()["data"]
        assert {m["max_model_len"] for m in models} == {176}
        assert {m["context_length"] for m in httpx.get(s.base + "/studio/v1/models").json()["data"]} == {176}
        long = "word " * 300
        r = httpx.post(s.base + "/v1/chat/completions",
                       json={"model": "jamba-mini", "messages": [{"role": "user", "content": long}]}, timeout=120)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "176" in r.json()["error"]["message"] and "budget" in r.json()["error"]["message"]
        r = httpx.post(s.base + "/studio/v1/chat/completions",
                       json={"model": "jamba-mini", "messages": [{"role": "user", "content": long}]}, timeout=120)
        assert r.status_code == 422 and "176" in r.text
        # What fits still runs; the answer is cut at the context, not refused.
        r = httpx.post(s.base + "/v1/chat/completions",
                       json={"model": "jamba-mini", "messages": USER, "max_tokens": 500, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 176
        assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        assert s.stop() == 0


def test_a_budget_too_small_for_one_block_refuses_to_start():
    port = free_port()
    p = subprocess.run([str(BIN), "serve", "--port", str(port), "-t", "1", "--kv-cache-mb", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "KV cache budget of 1 MiB cannot serve this model" in p.stderr


def test_the_fault_header_is_ignored_unless_fault_injection_is_enabled(http):
    r = http.post("/v1/chat/completions", headers={"x-taipan-fault": "kill-engine"},
                  json={"model": "jamba-mini", "messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


def test_injected_panics_fail_only_their_request_and_a_dead_engine_turns_health_503_and_exits():
    s = Server("--max-running", "8", env={"TAIPAN_FAULT_INJECTION": "1"})
    try:
        with httpx.Client(base_url=s.base, timeout=120) as c:
            body = {"model": "jamba-mini", "messages": USER, "max_tokens": 8, "temperature": 0}
            # A panic in one request's step: that request gets a 500 naming an internal error...
            r = c.post("/v1/chat/completions", headers={"x-taipan-fault": "panic-sequence"}, json=body)
            assert r.status_code == 500, r.text
            assert "internal error" in r.json()["error"]["message"]
            # ...streamed, an error chunk and [DONE]...
            r = c.post("/v1/chat/completions", headers={"x-taipan-fault": "panic-sequence"},
                       json={**body, "stream": True})
            events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and "internal error" in json.loads(events[-2])["error"]["message"]
            # ...and the server goes on serving.
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            assert c.get("/health").status_code == 200
            # The engine thread dies: the request fails, /health says 503, the process exits non-zero.
            r = c.post("/v1/chat/completions", headers={"x-taipan-fault": "kill-engine"}, json=body)
            assert r.status_code in (500, 503), r.text
            for _ in range(100):  # the thread marks itself stopped as it unwinds, just after
                h = c.get("/health")
                if h.status_code != 200:
                    break
                time.sleep(0.01)
            assert h.status_code == 503 and h.json()["status"] == "engine stopped"
        assert s.proc.wait(timeout=30) == 70
    finally:
        s.stop()
