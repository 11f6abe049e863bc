"""End to end: JSON mode, JSON schemas, tools and documents through the official ai21 and openai
SDKs, streamed and not, on the default model (SmolLM2-135M, which needs the constraint: left alone
it rarely writes valid JSON)."""
import concurrent.futures
import json
import re

import httpx
import openai
import pytest
from ai21.models.chat import ToolMessage, UserMessage
from ai21.models.chat.document_schema import DocumentSchema

from conftest import KEY, Server
from test_server import ai21_client, openai_client


@pytest.fixture(scope="module")
def server():
    """A server of its own, with the default queue: these tests send 16 requests at a time."""
    s = Server("--api-key", KEY)
    yield s
    assert s.stop() == 0

SUBJECTS = ["a cat", "the city of Paris", "a used car for sale", "a pizza recipe", "a football match",
            "a job applicant", "the planet Mars", "a birthday party", "a laptop", "a hiking trail",
            "a library book", "a hotel booking", "a music album", "a weather forecast", "a bank account",
            "a movie", "a garden", "a train timetable", "a restaurant review", "a chemistry experiment"]
ASKS = ["Describe {} as JSON.", "Give me the details of {}.", "Write a short profile of {}.",
        "What do you know about {}?", "Summarize {} in a few fields."]
PROMPTS = [ask.format(s) for s in SUBJECTS for ask in ASKS]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"], "additionalProperties": False}}}
TOOLS = [WEATHER, CALCULATOR]
TOOL_PROMPTS = ["What is the weather in Paris?", "How warm is it in Tokyo right now, in fahrenheit?",
                "Is it raining in London?", "Compute 17 * 23.", "What is 2 + 2?",
                "Use the calculator to find 15% of 80.", "Weather for Berlin please.",
                "Calculate the square root of 144."]

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}}, "required": ["name", "age"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
            "required": ["product", "quantity"], "additionalProperties": False}, "minItems": 1, "maxItems": 5},
        "express": {"type": "boolean"}}, "required": ["items", "express"], "additionalProperties": False},
    "review": {"type": "object", "properties": {
        "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "summary": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["rating", "sentiment", "summary"], "additionalProperties": False},
}


def validate(value, schema, path="$"):
    """The subset of JSON Schema these tests use; raises AssertionError naming the path."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r} is not an integer"
    elif t == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: not a number"
    elif t:
        assert isinstance(value, types[t]), f"{path}: {value!r} is not {t}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{path}: {value} < minimum"
    if "maximum" in schema:
        assert value <= schema["maximum"], f"{path}: {value} > maximum"
    if t == "object":
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, f"{path}: missing {k}"
        for k, v in value.items():
            if k in props:
                validate(v, props[k], f"{path}.{k}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{path}: extra key {k}"
    if t == "array":
        assert len(value) >= schema.get("minItems", 0), f"{path}: too few items"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{path}[{i}]")


def parallel(fn, items, workers=16):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def check_call(call, tools=TOOLS):
    """A tool call names a declared tool and its arguments (a JSON string) validate."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id
    assert call.function.name in by_name, call.function.name
    assert isinstance(call.function.arguments, str)
    validate(json.loads(call.function.arguments), by_name[call.function.name])


def test_json_object_at_temperature_one_always_parses(server):
    client = ai21_client(server)

    def ask(prompt):
        r = client.chat.completions.create(model="jamba-mini", messages=[UserMessage(content=prompt)],
                                           response_format={"type": "json_object"}, temperature=1.0,
                                           max_tokens=160)
        return r.choices[0].message.content

    answers = parallel(ask, PROMPTS)
    assert len(answers) == 100
    for prompt, text in zip(PROMPTS, answers):
        value = json.loads(text)
        assert isinstance(value, dict) and value, f"{prompt}: {text}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schemas_at_temperature_one_always_validate(server, name):
    client = openai_client(server)
    schema = SCHEMAS[name]

    def ask(i):
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        prompt = f"{PROMPTS[i]} Answer as a {name}."
        if i % 4 == 0:  # some streamed
            chunks = client.chat.completions.create(model="jamba-mini", messages=[{"role": "user", "content": prompt}],
                                                    response_format=fmt, temperature=1.0, max_tokens=160, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model="jamba-mini", messages=[{"role": "user", "content": prompt}],
                                           response_format=fmt, temperature=1.0, max_tokens=160)
        return r.choices[0].message.content

    for text in parallel(ask, range(len(PROMPTS))):
        validate(json.loads(text), schema)


def test_unsupported_schema_is_a_400_naming_the_field(server):
    client = openai_client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="jamba-mini", messages=[{"role": "user", "content": "hi"}],
                                       response_format=fmt)
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_openai_tool_choice_required_none_named_and_auto(server):
    client = openai_client(server)

    def ask(args):
        prompt, choice, stream = args
        kw = dict(model="jamba-mini", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                  tool_choice=choice, temperature=1.0, max_tokens=120, seed=7)
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message, r.choices[0].finish_reason
        # Reassemble the stream as OpenAI's clients do: calls by index, argument fragments joined.
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.id:
                    calls[tc.index] = {"id": tc.id, "type": tc.type,
                                       "function": {"name": tc.function.name, "arguments": ""}}
                calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        msg = openai.types.chat.ChatCompletionMessage.model_validate(
            {"role": "assistant", "content": content or None, "tool_calls": [calls[i] for i in sorted(calls)] or None})
        return msg, finish

    named = {"type": "function", "function": {"name": "calculator"}}
    jobs = [(p, c, k % 2 == 1) for k, p in enumerate(TOOL_PROMPTS) for c in ("required", "none", "auto", named)]
    for (prompt, choice, stream), (msg, finish) in zip(jobs, parallel(ask, jobs)):
        where = f"{prompt!r} tool_choice={choice} stream={stream}"
        if choice == "none":
            assert not msg.tool_calls and finish in ("stop", "length"), where
            continue
        if choice != "auto":
            assert msg.tool_calls, where
        for call in msg.tool_calls or []:
            check_call(call)
            if choice == named:
                assert call.function.name == "calculator", where
        if msg.tool_calls:
            assert finish == "tool_calls", where


def test_ai21_sdk_tool_calls_streamed_and_not_agree(server):
    """AI21 has no tool_choice; a weather question with only the weather tool and `required` sent
    as an extra field (the SDK forwards it) yields a call both ways, equal at temperature 0."""
    client = ai21_client(server)
    kw = dict(model="jamba-mini", messages=[UserMessage(content="What is the weather in Paris?")], tools=[WEATHER],
              temperature=0, max_tokens=60, tool_choice="required")
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call)
    name, args, ids, finish = None, "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        for tc in getattr(delta, "tool_calls", None) or []:
            tc = tc if isinstance(tc, dict) else tc.model_dump()
            assert tc["index"] == 0
            if "id" in tc:
                ids.append(tc["id"])
                name = tc["function"]["name"]
            args += tc["function"].get("arguments", "")
        finish = chunk.choices[0].finish_reason or finish
    assert (name, args, finish) == (call.function.name, call.function.arguments, "tool_calls")
    assert len(ids) == 1 and ids[0].startswith("chatcmpl-tool-")


def test_raw_ai21_stream_tool_call_deltas(http):
    body = {"model": "jamba-mini", "messages": [{"role": "user", "content": "Compute 3 * 4."}],
            "tools": [CALCULATOR], "tool_choice": "required", "temperature": 0, "max_tokens": 60, "stream": True}
    r = http.post("/studio/v1/chat/completions", json=body)
    lines = [line for line in r.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant"}
    first_call = next(d for d in deltas if "tool_calls" in d)["tool_calls"][0]
    assert list(first_call) == ["index", "id", "type", "function"]
    assert first_call["type"] == "function" and first_call["function"] == {"name": "calculator"}
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas if "tool_calls" in d)
    validate(json.loads(args), CALCULATOR["function"]["parameters"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and "usage" in events[-1]


def test_tool_results_round_trip_into_the_next_turn(server):
    """The official function-calling flow: the SDK's response message goes back as it is, with a
    tool message for its call; the second answer is plain text and the prompt grew."""
    client = ai21_client(server)
    messages = [UserMessage(content="What is the weather in Paris?")]
    first = client.chat.completions.create(model="jamba-mini", messages=messages, tools=[WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=60)
    msg = first.choices[0].message
    (call,) = msg.tool_calls
    messages.append(msg)
    messages.append(ToolMessage(content="18 degrees celsius and sunny", tool_call_id=call.id))
    second = client.chat.completions.create(model="jamba-mini", messages=messages, tools=[WEATHER],
                                            temperature=0, max_tokens=40)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert second.choices[0].message.role == "assistant"
    # The prompt shows the call and its result.
    oa = openai_client(server)
    r = oa.chat.completions.create(model="jamba-mini", max_tokens=1, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": "18 degrees celsius and sunny", "tool_call_id": call.id}], tools=[WEATHER])
    assert r.usage.prompt_tokens == second.usage.prompt_tokens


def test_documents_reach_the_prompt_and_are_validated(server, http):
    client = ai21_client(server)
    q = [UserMessage(content="Who wrote Harry Potter?")]
    plain = client.chat.completions.create(model="jamba-mini", messages=q, max_tokens=1)
    docs = [DocumentSchema(content="Harry Potter was written by J.K. Rowling.", id="hp",
                           metadata={"title": "Harry Potter", "genre": "fantasy"}),
            DocumentSchema(content="The Great Gatsby is by F. Scott Fitzgerald.")]
    grounded = client.chat.completions.create(model="jamba-mini", messages=q, documents=docs, max_tokens=60,
                                              temperature=0)
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + 25
    assert grounded.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="jamba-mini", messages=q, documents=docs, max_tokens=60, temperature=0, stream=True))
    assert streamed == grounded.choices[0].message.content
    for bad, field in [({"id": "1"}, ["body", "documents", 0, "content"]),
                       ({"content": "x", "metadata": {"year": 1997}}, ["body", "documents", 0, "metadata", "year"]),
                       ({"content": "x", "metadata": [{"key": "k"}]}, ["body", "documents", 0, "metadata", 0])]:
        r = http.post("/studio/v1/chat/completions", json={"model": "jamba-mini", "messages": [
            {"role": "user", "content": "hi"}], "documents": [bad]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == field, r.text


def test_json_mode_in_both_sdks_streamed_and_not(server):
    a = ai21_client(server)
    o = openai_client(server)
    msg = "Describe a cat with its name and age."
    full = a.chat.completions.create(model="jamba-mini", messages=[UserMessage(content=msg)], temperature=0,
                                     max_tokens=80, response_format={"type": "json_object"})
    streamed = "".join(c.choices[0].delta.content or "" for c in a.chat.completions.create(
        model="jamba-mini", messages=[UserMessage(content=msg)], temperature=0, max_tokens=80,
        response_format={"type": "json_object"}, stream=True))
    assert streamed == full.choices[0].message.content and isinstance(json.loads(streamed), dict)
    r = o.chat.completions.create(model="jamba-mini", messages=[{"role": "user", "content": msg}], temperature=0,
                                  max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_tool_choice_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(server).chat.completions.create(
            model="jamba-mini", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}})
    assert e.value.body["param"] == "tool_choice.function.name"
    r = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "jamba-mini", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_vllm_guided_fields_on_chat_and_completions(server):
    """Clients written for vLLM pass guided_choice/guided_regex/guided_json/guided_grammar (or
    structured_outputs) through the openai SDK's extra_body."""
    client = openai_client(server)

    def chat(extra, prompt="Is the sky blue?"):
        r = client.chat.completions.create(model="jamba-mini", messages=[{"role": "user", "content": prompt}],
                                           temperature=1.0, max_tokens=40, extra_body=extra)
        return r.choices[0].message.content

    for seed in range(4):
        assert chat({"guided_choice": ["yes", "no"], "seed": seed}) in ("yes", "no")
        phone = chat({"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}, "seed": seed}, "A phone number?")
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone), phone
        n = json.loads(chat({"guided_json": {"type": "integer", "minimum": 1, "maximum": 9}, "seed": seed}, "A digit?"))
        assert isinstance(n, int) and 1 <= n <= 9
        assert chat({"guided_grammar": 'start: "A" ("B" | "C")+ "."', "seed": seed}).startswith("A")
    text = client.completions.create(model="jamba-mini", prompt="The answer is", max_tokens=10,
                                     extra_body={"guided_regex": " (yes|no)\\."}).choices[0].text
    assert text in (" yes.", " no.")
    with pytest.raises(openai.BadRequestError) as e:
        chat({"guided_regex": "(unclosed"})
    assert e.value.body["param"] == "guided_regex"
