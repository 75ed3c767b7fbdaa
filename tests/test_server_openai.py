"""The OpenAI-compatible endpoints, driven by the official ``openai`` client: answers equal /v1/caption and
/v1/ask on the same image (greedy), streamed and not, with n > 1 and stop; bad requests get OpenAI's error
shape with the right status; both schedulers answer alike; /metrics speaks Prometheus."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai", reason="the openai client (a test dependency) is not installed")

from blip2.apps.pipeline import GenerationOptions, Pipeline
from blip2.apps.server import ServerSettings
from test_server import Served, png

SETTINGS = dict(options=GenerationOptions(max_new_tokens=8), max_batch_size=4, max_wait_ms=20, timeout_s=120,
                max_upload_bytes=60_000, max_pixels=200 * 200)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module", params=["continuous", "micro"])
def server(request, pipe) -> Iterator[str]:
    served = Served(pipe, ServerSettings(scheduler=request.param, **SETTINGS))
    yield served.url
    served.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str, image: bytes, question: str | None) -> str:
    files = {"image": ("a.png", image, "image/png")}
    if question is None:
        return httpx.post(url + "/v1/caption", files=files, timeout=60).json()["caption"]
    return httpx.post(url + "/v1/ask", files=files, data={"question": question}, timeout=60).json()["answer"]


def user(image: bytes, text: str | None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def model_id(client) -> str:
    (model,) = client.models.list().data
    return model.id


@pytest.mark.parametrize("question", [None, "what is in the picture?"])
def test_chat_equals_caption_and_ask_streamed_and_not(pipe, server, client, question):
    image = png(3)
    expected = ask(server, image, question)
    reply = client.chat.completions.create(model=model_id(client), messages=[user(image, question)])
    (choice,) = reply.choices
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > pipe.model.config.num_query_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="m", messages=[user(image, question)], stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_n_and_stop(server, client):
    image = png(5)
    expected = ask(server, image, "what colour is it?")
    reply = client.completions.create(model="m", prompt="Question: what colour is it? Answer:", n=3,
                                      extra_body={"image": data_url(image)})
    assert [c.text for c in reply.choices] == [expected] * 3 and [c.index for c in reply.choices] == [0, 1, 2]
    assert len(expected) > 3
    stop = expected[1:3]
    cut = expected[: expected.index(stop)].rstrip()
    reply = client.completions.create(model="m", prompt="Question: what colour is it? Answer:", stop=[stop],
                                      extra_body={"image": data_url(image)})
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt="Question: what colour is it? Answer:", stop=stop,
                                         stream=True, extra_body={"image": data_url(image)})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_max_tokens_ends_with_length_and_a_chat_keeps_its_history(server, client):
    image = png(9)
    reply = client.chat.completions.create(model="m", messages=[user(image, "what is it?")], max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 2
    answer = ask(server, image, "what is it?")
    messages = [user(image, "what is it?"), {"role": "assistant", "content": answer},
                {"role": "user", "content": "where is it?"}]
    again = client.chat.completions.create(model="m", messages=messages)
    form = {"image": ("a.png", image, "image/png")}
    chat_prompt = f"Question: what is it? Answer: {answer.strip().rstrip('.')}. Question: where is it? Answer:"
    caption = httpx.post(server + "/v1/caption", files=form, data={"prompt": chat_prompt}, timeout=60).json()
    assert again.choices[0].message.content == caption["caption"]


def test_sampling_with_a_seed_repeats(client):
    image = png(4)
    kw = dict(model="m", messages=[user(image, None)], temperature=1.3, top_p=0.9, seed=5, n=2)
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == \
           [c.message.content for c in client.chat.completions.create(**kw).choices]


@pytest.mark.parametrize("messages, status, param, needle", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     400, "messages", "not fetched"),
    ([{"role": "user", "content": "what is it?"}], 400, "messages", "no image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     400, "messages", "base64"),
    ([{"role": "robot", "content": "hi"}], 400, "messages[0].role", "user, assistant"),
])
def test_bad_chats_get_openai_errors(client, messages, status, param, needle):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=messages)
    assert info.value.status_code == status
    error = info.value.body
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_oversized_and_out_of_range_requests(server, client):
    big = png(1, size=(300, 300))  # 90000 pixels, over max_pixels
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[user(big, None)])
    assert info.value.status_code == 413 and "too large" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[user(png(1), None)], max_tokens=9)
    assert info.value.body["param"] == "max_tokens" and "1 to 8" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[user(png(1), None)], n=5)
    assert info.value.body["param"] == "n"
    body = httpx.post(server + "/v1/chat/completions", content=b"x" * 70_000, timeout=30)
    assert body.status_code == 413 and "over the limit" in body.json()["error"]["message"]
    body = httpx.post(server + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert body.status_code == 400 and "not valid JSON" in body.json()["error"]["message"]


def test_prometheus_metrics(server, client):
    client.chat.completions.create(model="m", messages=[user(png(2), None)], max_tokens=2)
    text = httpx.get(server + "/metrics?format=prometheus", timeout=30)
    assert text.headers["content-type"].startswith("text/plain")
    lines = text.text.splitlines()
    ok = [l for l in lines if l.startswith('blip2_responses_total{method="POST",path="/v1/chat/completions",status="200"}')]
    assert ok and int(ok[0].split()[-1]) >= 1
    count = [l for l in lines if l.startswith('blip2_request_seconds_count{path="/v1/chat/completions"}')]
    assert count and int(count[0].split()[-1]) >= 1
    assert any(l.startswith("blip2_queue_length ") for l in lines)
    assert httpx.get(server + "/metrics", headers={"accept": "text/plain"}, timeout=30).text.startswith("# HELP")
    assert "responses" in httpx.get(server + "/metrics", timeout=30).json()
