"""End to end on the optional second model, Gemma 3 270M Q4_K_M (a k-quant GGUF with no chat
template of its own): the founding request through the official ai21 SDK."""
import os
from pathlib import Path

import pytest
from ai21 import AI21Client
from ai21.models.chat import ChatMessage

from conftest import Server

GEMMA = Path(os.environ.get("TAIPAN_MODEL_DIR", Path.home() / ".cache" / "taipan" / "models")) / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma():
    assert GEMMA.exists(), f"{GEMMA} is missing: run scripts/get-gemma3.sh (scripts/test.sh does)"
    s = Server("--model", str(GEMMA))
    yield s
    assert s.stop() == 0


def test_gemma3_answers_the_seed_request_through_the_ai21_sdk(gemma):
    client = AI21Client(api_key="unused", api_host=gemma.base + "/studio/v1")
    response = client.chat.completions.create(
        model="jamba-1.5-large",
        messages=[
            ChatMessage(role="system", content="You are an assistant for the company Coca Cola"),
            ChatMessage(role="user", content="allo"),
            ChatMessage(role="assistant", content="Hello! How can I assist you today?"),
            ChatMessage(role="user", content="what is Coca Cola"),
        ],
        documents=[],
        tools=[],
        n=1,
        max_tokens=2048,
        temperature=0.4,
        top_p=1,
        stop=[],
    )
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content and "<end_of_turn>" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = response.usage
    # The Gemma turn format: system text folded into the first user turn, three turns before ours.
    assert u.prompt_tokens > 30 and u.total_tokens == u.prompt_tokens + u.completion_tokens
