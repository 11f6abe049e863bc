"""End to end: a thinking model with Hermes tool calls (jamba-tiny-dense, Jamba Reasoning 3B's
form) through the official openai and ai21 SDKs: thinking kept apart from the answer
(`reasoning_content`), streamed and not; structured output constraining the answer only; Hermes
calls forced, named and optional.

The model has random weights and would think forever: the server runs with
`--reasoning-budget 6`, so `</think>` comes as the seventh token and an answer follows."""
import json

import pytest
from ai21.models.chat import UserMessage

from conftest import KEY, ROOT, Server
from test_server import ai21_client, openai_client
from test_structured import check_call, parallel

MODEL = ROOT / "tests" / "fixtures" / "jamba-tiny-dense"
BUDGET = 6
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def server():
    s = Server("-m", str(MODEL), "--api-key", KEY, "--reasoning-budget", str(BUDGET), "--kv-cache-mb", "64")
    yield s
    assert s.stop() == 0


def openai_stream(client, **kw):
    """Reassembles a stream as OpenAI clients do: text, thinking, calls by index."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for tc in delta.tool_calls or []:
            if tc.id:
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


def test_openai_thinking_apart_from_the_answer_streamed_and_not(server):
    client = openai_client(server)
    for seed in range(1, 5):
        kw = dict(model="jamba-mini", messages=[{"role": "user", "content": "What is 2+2?"}],
                  temperature=1.0, max_tokens=24, seed=seed)
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert msg.reasoning_content and "</think>" not in msg.reasoning_content, msg
        assert msg.content and "<think>" not in msg.content and "</think>" not in msg.content, msg
        # Every generated token is counted, the thinking's too.
        assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
        content, reasoning, calls, finish = openai_stream(client, **kw)
        assert (content, reasoning, calls, finish) == (msg.content, msg.reasoning_content, [], "length")


def test_a_budget_that_ends_inside_the_thinking_gives_no_answer(server):
    client = openai_client(server)
    kw = dict(model="jamba-mini", messages=[{"role": "user", "content": "Hi"}], temperature=1.0,
              max_tokens=BUDGET - 2, seed=3)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert msg.content == "" and msg.reasoning_content, msg
    content, reasoning, _, finish = openai_stream(client, **kw)
    assert (content, reasoning, finish) == ("", msg.reasoning_content, "length")


def test_json_mode_constrains_the_answer_not_the_thinking(server):
    client = openai_client(server)

    def ask(seed):
        r = client.chat.completions.create(
            model="jamba-mini", messages=[{"role": "user", "content": "Describe a cat as JSON."}],
            response_format={"type": "json_object"}, temperature=1.0, max_tokens=120, seed=seed)
        return r.choices[0]

    for choice in parallel(ask, range(8), workers=8):
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert choice.message.reasoning_content, choice.message


def test_hermes_tools_required_named_and_auto(server):
    client = openai_client(server)
    choices = {"required": "required", "named": {"type": "function", "function": {"name": "add"}}, "auto": "auto"}

    def ask(args):
        seed, choice, stream = args
        kw = dict(model="jamba-mini", messages=[{"role": "user", "content": "Weather in Paris, and 2+3?"}],
                  tools=TOOLS, tool_choice=choices[choice], temperature=1.0, max_tokens=160, seed=seed)
        if stream:
            return openai_stream(client, **kw)
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
        for c in msg.tool_calls or []:
            check_call(c, TOOLS)
        return msg.content, msg.reasoning_content, calls, r.choices[0].finish_reason

    jobs = [(seed, choice, stream) for seed in (1, 2, 3) for choice in choices for stream in (False, True)]
    results = dict(zip(jobs, parallel(ask, jobs, workers=8)))
    for (seed, choice, stream), (content, reasoning, calls, finish) in results.items():
        where = f"seed {seed} tool_choice={choice} stream={stream}"
        assert reasoning, where
        if choice != "auto":
            assert calls and finish == "tool_calls", f"{where}: {content!r}"
            assert not content, where
        for call in calls:
            by_name = {t["function"]["name"]: t for t in TOOLS}
            assert call["name"] in by_name, where
            json.loads(call["arguments"])
            if choice == "named":
                assert call["name"] == "add", where
        if not stream:
            # The stream joins to the same answer, fragment by fragment.
            assert results[(seed, choice, True)] == (content or "", reasoning, calls, finish), where


def test_ai21_sdk_answer_only_with_thinking_alongside(server):
    """The AI21 dialect's `content` is the answer alone; the thinking rides along as
    `reasoning_content`, which the SDK keeps as an extra field of the message and the delta."""
    client = ai21_client(server)
    for tool_choice, tools in [("required", TOOLS[:1]), ({"type": "function", "function": {"name": "add"}}, TOOLS)]:
        kw = dict(model="jamba-mini", messages=[UserMessage(content="Weather in Rome?")], tools=tools,
                  tool_choice=tool_choice, parallel_tool_calls=False, temperature=1.0, max_tokens=120, seed=5)
        full = client.chat.completions.create(**kw)
        choice = full.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        check_call(call, TOOLS)
        assert call.function.name == tools[-1]["function"]["name"]
        assert choice.message.reasoning_content
        reasoning, args, finish = "", "", None
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for tc in getattr(delta, "tool_calls", None) or []:
                tc = tc if isinstance(tc, dict) else tc.model_dump()
                args += tc["function"].get("arguments", "")
            finish = chunk.choices[0].finish_reason or finish
        assert (reasoning, args, finish) == (choice.message.reasoning_content, call.function.arguments, "tool_calls")

    plain = client.chat.completions.create(model="jamba-mini", messages=[UserMessage(content="Hi")],
                                           temperature=1.0, max_tokens=20, seed=2)
    msg = plain.choices[0].message
    assert msg.content and "</think>" not in msg.content and msg.reasoning_content


def test_reasoning_format_none_leaves_the_thinking_in_the_answer(server):
    """With `none` the same tokens come back as they were written: all of it is `content`."""
    kw = dict(model="jamba-mini", messages=[{"role": "user", "content": "Hi"}], temperature=1.0,
              max_tokens=BUDGET - 1, seed=9)
    split = openai_client(server).chat.completions.create(**kw).choices[0].message
    s = Server("-m", str(MODEL), "--reasoning-format", "none", "--kv-cache-mb", "64")
    try:
        raw = openai_client(s).chat.completions.create(**kw).choices[0].message
    finally:
        assert s.stop() == 0
    assert getattr(raw, "reasoning_content", None) is None and split.content == ""
    assert raw.content.strip() == split.reasoning_content, (raw, split)


def test_reasoning_format_separate_refuses_a_model_without_thinking():
    s = Server("--reasoning-format", "separate", wait=False)
    assert s.proc.wait(timeout=120) != 0
    log = open(s.log.name).read()
    assert "--reasoning-format separate" in log and "<think>" in log, log
