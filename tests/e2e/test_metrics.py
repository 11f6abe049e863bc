"""What routers and autoscalers read: the Prometheus exposition on /metrics (parsed by the real
prometheus_client parser, under load) and OpenAI's usage.prompt_tokens_details.cached_tokens."""
import re
import threading
import time
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Server

JAMBA = ROOT / "tests" / "fixtures" / "jamba-tiny-a.gguf"
PROTOCOL_GAUGES = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:gpu_cache_usage_perc", "vllm:cache_config_info"]


SCRAPER = httpx.Client(timeout=10)  # one connection, as a Prometheus scraper keeps


def scrape(base):
    """All samples by name, the metric types by family name, and the scrape's latency."""
    t = time.perf_counter()
    text = SCRAPER.get(base + "/metrics").text
    took = time.perf_counter() - t
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples, types, took


def value(samples, name):
    (s,) = samples[name]
    return s.value


@pytest.fixture(scope="module")
def busy_server():
    s = Server("--max-running", "2", "--max-queue", "32", "--kv-cache-mb", "16")
    yield s
    assert s.stop() == 0


def test_protocol_gauges_under_load(busy_server):
    base = busy_server.base
    idle, types, _ = scrape(base)
    for name in PROTOCOL_GAUGES:
        assert types[name] == "gauge", name
        (s,) = idle[name]
        if name != "vllm:cache_config_info":
            assert s.labels["model_name"], name
    info = idle["vllm:cache_config_info"][0]
    assert info.value == 1 and int(info.labels["block_size"]) == 16
    assert int(info.labels["num_gpu_blocks"]) == value(idle, "taipan_kv_cache_blocks_total")
    assert value(idle, "vllm:num_requests_waiting") == 0 and value(idle, "vllm:num_requests_running") == 0
    idle_kv = value(idle, "vllm:kv_cache_usage_perc")
    assert 0 <= idle_kv <= 1

    # Eight long answers against two running slots: six wait while two run.
    prompt = "Tell me a long story about a lighthouse keeper. " * 12

    def ask():
        httpx.post(base + "/v1/completions", timeout=300, json={
            "model": "jamba-mini", "prompt": prompt, "max_tokens": 160, "ignore_eos": True, "temperature": 0})

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    seen_waiting, seen_running, kv, latencies = 0, 0, [], []
    while any(t.is_alive() for t in threads):
        samples, _, took = scrape(base)
        latencies.append(took)
        waiting = value(samples, "vllm:num_requests_waiting")
        running = value(samples, "vllm:num_requests_running")
        assert running == value(samples, "taipan_running_sequences") and running <= 2
        assert waiting == value(samples, "taipan_queue_length")
        usage = value(samples, "vllm:kv_cache_usage_perc")
        assert 0 <= usage <= 1 and usage == value(samples, "vllm:gpu_cache_usage_perc")
        seen_waiting, seen_running = max(seen_waiting, waiting), max(seen_running, running)
        kv.append(usage)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert seen_waiting > 0 and seen_running == 2
    assert max(kv) > idle_kv
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"\n/metrics under load: {len(latencies)} scrapes, p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
          f"p99 {p99 * 1e3:.2f} ms")
    done, _, _ = scrape(base)
    assert value(done, "vllm:num_requests_waiting") == 0 and value(done, "vllm:num_requests_running") == 0


def hits(base):
    return int(float(re.search(r"^taipan_prefix_cache_hit_tokens_total (\S+)", httpx.get(base + "/metrics").text,
                               re.M).group(1)))


def check_cached_tokens(base, chat):
    """A cold prompt reports 0 cached tokens; the same prompt again reports exactly what the engine
    counted as prefix hits, > 0; streamed usage says the same."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    text = f"Note {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog. " * 8

    def ask(**extra):
        if chat:
            messages = [{"role": "system", "content": text}, {"role": "user", "content": "Go on."}]
            return client.chat.completions.create(model="jamba-mini", messages=messages, max_tokens=4,
                                                  temperature=0, **extra)
        return client.completions.create(model="jamba-mini", prompt=text, max_tokens=4, temperature=0, **extra)

    before = hits(base)
    cold = ask()
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hits(base) == before
    warm = ask()
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= warm.usage.prompt_tokens and cached == hits(base) - before
    mid = hits(base)
    chunks = list(ask(stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == hits(base) - mid > 0
    return cached, warm.usage.prompt_tokens


def test_cached_tokens_on_llama(open_server):
    cached, _ = check_cached_tokens(open_server.base, chat=False)
    assert cached % 16 == 0  # whole KV blocks


def test_cached_tokens_on_jamba():
    s = Server("--model", str(JAMBA))
    try:
        # A Jamba resumes from a recurrent state saved where the system message ends.
        cached, prompt = check_cached_tokens(s.base, chat=True)
        print(f"\nJamba: {cached} of {prompt} prompt tokens from a saved state")
    finally:
        assert s.stop() == 0


def test_cached_tokens_in_chat_usage_not_in_ai21(open_server):
    client = openai.OpenAI(base_url=open_server.base + "/v1", api_key="none")
    messages = [{"role": "system", "content": f"Session {uuid.uuid4().hex}. " + "Answer briefly and politely. " * 6},
                {"role": "user", "content": "Hello there"}]
    first = client.chat.completions.create(model="jamba-mini", messages=messages, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model="jamba-mini", messages=messages, max_tokens=3, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    ai21 = httpx.post(open_server.base + "/studio/v1/chat/completions", timeout=60,
                      json={"model": "jamba-mini", "messages": messages, "max_tokens": 3}).json()
    assert list(ai21["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]
