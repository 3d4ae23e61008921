"""The OpenAI-compatible API (`tritonkit serve REPO --openai-port`) called with the official
`openai` SDK over real HTTP, against a real tritonserver serving CLIP, LLaVA and Whisper."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile

from tests import openai_conformance as conformance
from tests.conftest import encode_image, free_port, random_image, serve_with_gateway
from tritonkit.client import TritonkitClient, executed_batch_sizes

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")
KEY = "test-key-not-secret"
HTTP = conformance.client()  # raw HTTP requests, their answers checked against OpenAI's document


@pytest.fixture(scope="module")
def gateway(clip_repository, llava_repository, whisper_repository, tmp_path_factory):
    """serve + gateway on one repository holding the three families' builds."""
    repository = tmp_path_factory.mktemp("gateway") / "model_repository"
    for source in (clip_repository, llava_repository, whisper_repository):
        for model in source.iterdir():
            if (model / "config.pbtxt").is_file():
                shutil.copytree(model, repository / model.name, ignore=shutil.ignore_patterns("__pycache__"))
    with serve_with_gateway(repository, KEY) as urls:
        yield urls


@pytest.fixture(scope="module")
def sdk(gateway):
    return conformance.sdk(base_url=f"{gateway[0]}/v1", api_key=KEY, max_retries=0)


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_models_lists_every_family(sdk):
    served = {m.id for m in sdk.models.list().data}
    assert {"clip", "llava", "whisper"} <= served


def test_text_and_image_embeddings_equal_the_ensembles_normalised(sdk, gateway):
    texts = ["a photo of a cat", "two dogs on a beach"]
    image = encode_image(random_image(120, 160, seed=3), "JPEG")
    with TritonkitClient(gateway[1]) as client:
        want_text = unit(client.embed_texts(texts))
        want_image = unit(client.embed_images([image]))
    got = sdk.embeddings.create(model="clip", input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1]
    vectors = np.array([d.embedding for d in got.data])
    assert (vectors * want_text).sum(-1).min() >= 0.9999
    as_float = sdk.embeddings.create(model="clip", input=texts, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in as_float.data]), vectors, rtol=0, atol=1e-7)
    assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens
    pictured = sdk.embeddings.create(model="clip", input=[data_url(image)])
    assert (np.array(pictured.data[0].embedding) * want_image[0]).sum() >= 0.9999
    raw = sdk.embeddings.create(model="clip", input=texts[:1], encoding_format="float", extra_body={"normalize": False})
    with TritonkitClient(gateway[1]) as client:
        np.testing.assert_allclose(raw.data[0].embedding, client.embed_texts(texts[:1])[0], rtol=1e-5, atol=1e-6)


def test_a_corrupt_image_is_a_400_with_the_models_message_while_batch_mates_succeed(sdk):
    good = data_url(encode_image(random_image(100, 100, seed=4), "JPEG"))
    bad = data_url(b"%PDF-1.4 not an image")

    def call(item):
        try:
            return sdk.embeddings.create(model="clip", input=[item]).data[0].embedding
        except openai.BadRequestError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, [good, bad, good, good, bad, good]))
    for i in (1, 4):
        assert isinstance(results[i], openai.BadRequestError)
        error = results[i].body
        assert error["message"].startswith("IMAGE: not a decodable image"), error
        assert error["param"] == "input[0]" and error["type"] == "invalid_request_error"
    assert all(isinstance(results[i], list) for i in (0, 2, 3, 5))


def test_chat_equals_the_chat_ensemble_whole_and_streamed(sdk, gateway):
    image = encode_image(random_image(80, 96, seed=5), "JPEG")
    with TritonkitClient(gateway[1]) as client:
        want = client.chat(image, "What is in the picture?", max_new_tokens=10)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        }
    ]
    whole = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=10)
    assert whole.choices[0].message.content == want
    usage = whole.usage
    assert (
        usage.completion_tokens <= 10
        and usage.prompt_tokens > 16
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    assert whole.choices[0].finish_reason == ("length" if usage.completion_tokens == 10 else "stop")
    pieces = [
        c.choices[0].delta.content or ""
        for c in sdk.chat.completions.create(model="llava", messages=messages, max_tokens=10, stream=True)
    ]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 1


def test_a_conversation_with_system_and_earlier_turns_equals_the_ensemble_and_streams_usage(sdk, gateway):
    image = encode_image(random_image(88, 72, seed=7), "JPEG")
    served = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A small red boat."},
        {"role": "user", "content": "And the sky?"},
    ]
    with TritonkitClient(gateway[1]) as client:
        want = client.chat(image, served, max_new_tokens=10)
    messages = [
        {"role": "developer", "content": "Answer in one short sentence."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A small red boat."},
        {"role": "user", "content": "And the sky?"},
    ]
    whole = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=10)
    assert whole.choices[0].message.content == want
    chunks = list(
        sdk.chat.completions.create(
            model="llava", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # OpenAI's last chunk: usage alone
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role"):
        sdk.chat.completions.create(model="llava", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_chat_rejects_what_it_cannot_answer_with_a_400(sdk):
    with pytest.raises(openai.BadRequestError, match="start it with --allow-url-fetch"):
        sdk.chat.completions.create(
            model="llava",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}
            ],
        )
    image = data_url(encode_image(random_image(64, 64, seed=6), "JPEG"))
    two = [{"type": "image_url", "image_url": {"url": image}}] * 2
    with pytest.raises(openai.BadRequestError, match="exactly one image_url part is needed, got 2"):
        sdk.chat.completions.create(model="llava", messages=[{"role": "user", "content": two}])
    with pytest.raises(openai.BadRequestError, match=r"temperature: 9.0 is greater than the maximum of 2") as raised:
        sdk.chat.completions.create(
            model="llava",
            temperature=9.0,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": image}}],
                }
            ],
        )
    assert raised.value.body["param"] == "temperature"


def test_a_chat_turn_without_an_image_equals_the_text_ensemble_whole_and_streamed(sdk, gateway):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Write a short poem about the sea."},
    ]
    with TritonkitClient(gateway[1]) as client:
        want = client.chat(None, messages, model="llava_chat", max_new_tokens=10)
    whole = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=10)
    assert whole.choices[0].message.content == want and whole.usage.completion_tokens <= 10
    streamed = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_logprobs_are_the_ensembles_whole_and_streamed(sdk, gateway):
    import json

    from tritonkit.client import chat_inputs

    messages = [{"role": "user", "content": "Name three colours."}]
    with TritonkitClient(gateway[1]) as client:
        outputs = client.infer("llava_chat_text", chat_inputs(None, messages, max_new_tokens=6, top_logprobs=2))
    want = json.loads(outputs["LOGPROBS"][0, 0])
    whole = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
    got = [entry.model_dump() for entry in whole.choices[0].logprobs.content]
    assert len(got) == len(want) == whole.usage.completion_tokens
    assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in want]
    assert np.allclose([e["logprob"] for e in got], [e["logprob"] for e in want], atol=1e-6)
    assert all(len(e["top_logprobs"]) == 2 for e in got)
    streamed = sdk.chat.completions.create(
        model="llava", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2, stream=True
    )
    pieces = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert pieces == [e["token"] for e in want]
    plain = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=6)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs: true"):
        sdk.chat.completions.create(model="llava", messages=messages, max_tokens=2, top_logprobs=2)


def test_n_choices_are_each_the_ensembles_answer_whole_and_streamed(sdk, gateway):
    """n: greedy choices are the one answer; sampled choices use seed + k (each reproducible);
    streamed choices arrive under their own index; usage counts the prompt once."""
    from tritonkit.client import chat_inputs

    messages = [{"role": "user", "content": "Name an animal."}]
    with TritonkitClient(gateway[1]) as client:
        greedy = client.chat(None, messages, max_new_tokens=6)
        sampled = [client.chat(None, messages, max_new_tokens=6, temperature=1.0, seed=40 + k) for k in range(3)]
        one = client.infer("llava_chat_text", chat_inputs(None, messages, max_new_tokens=6))
    whole = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=6, n=2)
    assert [c.index for c in whole.choices] == [0, 1] and all(c.message.content == greedy for c in whole.choices)
    assert whole.usage.prompt_tokens == int(one["PROMPT_TOKENS"][0, 0])
    assert whole.usage.completion_tokens == 2 * int(one["COMPLETION_TOKENS"][0, 0])
    drawn = sdk.chat.completions.create(model="llava", messages=messages, max_tokens=6, n=3, temperature=1.0, seed=40)
    assert [c.message.content for c in drawn.choices] == sampled and len(set(sampled)) > 1
    streamed = sdk.chat.completions.create(
        model="llava", messages=messages, max_tokens=6, n=3, temperature=1.0, seed=40, stream=True
    )
    texts = ["", "", ""]
    for c in streamed:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == sampled
    with pytest.raises(openai.BadRequestError, match="n: 1 to 4 choices"):
        sdk.chat.completions.create(model="llava", messages=messages, max_tokens=2, n=5)


SCENE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "outdoor": {"type": "boolean"},
    },
    "required": ["name", "colour", "count", "outdoor"],
    "additionalProperties": False,
}


def test_structured_outputs_answer_valid_json_of_the_schema_beside_free_requests(sdk):
    """response_format json_schema (strict) on the random tiny LLaVA: every answer parses and
    validates, alone, streamed, and sent together with unconstrained requests; a schema the
    grammar library cannot use is a 400 naming response_format."""
    import json

    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCENE, "strict": True}}
    image = data_url(encode_image(random_image(64, 64, seed=4), "JPEG"))

    def ask(k: int):
        content = [{"type": "text", "text": f"Describe scene {k}."}]
        if k % 2:
            content.append({"type": "image_url", "image_url": {"url": image}})
        extra = {"response_format": response_format} if k < 4 else {}
        return sdk.chat.completions.create(
            model="llava", messages=[{"role": "user", "content": content}], max_tokens=120, **extra
        )

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for answer in answers[:4]:
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCENE)
        assert answer.choices[0].finish_reason == "stop"
    free = [a.choices[0].message.content for a in answers[4:]]
    assert all(not text.startswith('{"') for text in free), free
    streamed = sdk.chat.completions.create(
        model="llava",
        messages=[{"role": "user", "content": "Describe scene 0."}],
        max_tokens=120,
        response_format=response_format,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answers[0].choices[0].message.content
    bad = {"type": "json_schema", "json_schema": {"name": "broken", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError, match="broken cannot constrain decoding") as raised:
        sdk.chat.completions.create(model="llava", messages=[{"role": "user", "content": "x"}], response_format=bad)
    assert raised.value.body["param"] == "response_format"


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "expected boolean or null"),
        ({"messages": [{"role": "usr", "content": "x"}]}, "messages[0].role", 'expected one of "assistant"'),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type", "file"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens", "expected integer"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, "top_logprobs", "maximum of 20"),
        ({"messages": []}, "messages", "should be non-empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url",
            "missing required url",
        ),
    ],
)
def test_a_chat_request_outside_openais_schema_is_a_400_naming_the_param(gateway, body, param, message):
    answer = HTTP.post(
        f"{gateway[0]}/v1/chat/completions",
        json={"model": "llava", **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error", error
    assert message in error["message"] and error["message"].startswith(f"{param}: "), error


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"temperature": "hot"}, "temperature", "expected number, got string"),
        ({"response_format": "xml"}, "response_format", 'expected one of "json"'),
        ({"timestamp_granularities[]": "words"}, "timestamp_granularities[0]", 'expected one of "word"'),
        ({"colour": "red"}, None, "unknown field colour"),
        ({"stream": "true", "response_format": "srt"}, "stream", "with response_format json or text"),
    ],
)
def test_a_transcription_form_outside_openais_schema_is_a_400_naming_the_field(
    gateway, speech_files, fields, param, message
):
    answer = HTTP.post(
        f"{gateway[0]}/v1/audio/transcriptions",
        data={"model": "whisper", **fields},
        files={"file": ("a.wav", speech_files[0])},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == param and message in error["message"], error
    if param is not None:
        return
    taken = HTTP.post(  # unknown fields are refused, but faster-whisper's and speaches' are taken
        f"{gateway[0]}/v1/audio/transcriptions",
        data={"model": "whisper", "beam_size": "1", "seed": "3", "vad_filter": "false", "temperature": "0"},
        files={"file": ("a.wav", speech_files[0])},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert taken.status_code == 200, taken.text


def test_an_embedding_request_outside_openais_schema_is_a_400_and_extensions_are_taken(sdk, gateway):
    headers = {"Authorization": f"Bearer {KEY}"}
    refused = HTTP.post(
        f"{gateway[0]}/v1/embeddings", json={"model": "clip", "input": "a", "user": 5}, headers=headers, timeout=60
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "user", refused.text
    unknown = HTTP.post(
        f"{gateway[0]}/v1/embeddings", json={"model": "clip", "input": "a", "colour": 1}, headers=headers, timeout=60
    )
    assert unknown.status_code == 400 and "unknown field colour" in unknown.json()["error"]["message"]
    taken = HTTP.post(  # the gateway's own fields beside OpenAI's
        f"{gateway[0]}/v1/embeddings",
        json={"model": "clip", "input": "a", "modality": "text", "normalize": False},
        headers=headers,
        timeout=60,
    )
    assert taken.status_code == 200, taken.text


def test_transcriptions_equal_the_ensemble_and_bad_audio_is_a_400(sdk, gateway, speech_files, tmp_path):
    with TritonkitClient(gateway[1]) as client:
        want = client.transcribe([speech_files[0]])[0].text
    path = tmp_path / "speech.wav"
    path.write_bytes(speech_files[0])
    with path.open("rb") as f:
        assert sdk.audio.transcriptions.create(model="whisper", file=f).text == want
    with path.open("rb") as f:
        assert sdk.audio.transcriptions.create(model="whisper", file=f, response_format="text").strip() == want
    with pytest.raises(openai.BadRequestError, match="AUDIO: not a decodable audio file"):
        sdk.audio.transcriptions.create(model="whisper", file=("broken.wav", b"RIFF not audio"))
    with path.open("rb") as f, pytest.raises(openai.BadRequestError, match="translate needs a multilingual model"):
        sdk.audio.translations.create(model="whisper", file=f)


def test_auth_unknown_models_and_oversized_bodies(gateway):
    base = gateway[0]
    with pytest.raises(openai.AuthenticationError):
        conformance.sdk(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    good = conformance.sdk(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not a served embeddings model"):
        good.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.APIStatusError) as caught:
        good.embeddings.create(model="clip", input="x" * (101 * 1024 * 1024))
    assert caught.value.status_code == 413


def test_concurrent_http_requests_are_batched_by_triton(sdk, gateway):
    with TritonkitClient(gateway[1]) as client:
        before = executed_batch_sizes(client.statistics("clip_text_encoder"), "clip_text_encoder")
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: sdk.embeddings.create(model="clip", input=f"caption number {i}"), range(48)))
    with TritonkitClient(gateway[1]) as client:
        after = executed_batch_sizes(client.statistics("clip_text_encoder"), "clip_text_encoder")
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), after


def test_health_and_metrics(gateway, sdk):
    base = gateway[0]
    assert urllib.request.urlopen(f"{base}/health", timeout=5).status == 200
    sdk.embeddings.create(model="clip", input="counted")  # this test's own request, whatever ran before
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert 'tritonkit_gateway_requests_total{endpoint="/v1/embeddings",model="clip",status="200"}' in text


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (Debian's package; scripts/setup.sh installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: scripts/setup.sh installs it (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield process, port
    process.terminate()
    process.wait(timeout=10)


def metric_value(base: str, name: str) -> float:
    from tritonkit.replicas import metric_sum

    return metric_sum(f"{base}/metrics", name)


@contextlib.contextmanager
def standalone_gateway(triton_url: str, *options: str):
    """`tritonkit openai` in front of the running server, with its own options."""
    from tritonkit.gateway import spawn_gateway

    process, base = spawn_gateway(triton_url, *options)
    try:
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_redis_cache_answers_repeats_and_a_stopped_redis_degrades_to_uncached(gateway, redis_server):
    process, redis_port = redis_server
    with standalone_gateway(
        gateway[1], "--cache-url", f"redis://127.0.0.1:{redis_port}/0", "--cache-ttl", "60"
    ) as base:
        sdk = conformance.sdk(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with TritonkitClient(gateway[1]) as client:

            def encoder_runs() -> int:
                return sum(executed_batch_sizes(client.statistics("clip_text_encoder"), "clip_text_encoder").values())

            first = sdk.embeddings.create(model="clip", input="a cached caption", encoding_format="float")
            runs = encoder_runs()
            again = sdk.embeddings.create(model="clip", input="a cached caption", encoding_format="float")
            assert encoder_runs() == runs  # answered from Redis: the encoder did not run
        assert again.data[0].embedding == first.data[0].embedding
        assert metric_value(base, "tritonkit_gateway_embedding_cache_hits_total") == 1
        assert metric_value(base, "tritonkit_gateway_embedding_cache_misses_total") == 1
        process.terminate()
        process.wait(timeout=10)
        degraded = sdk.embeddings.create(model="clip", input="a cached caption", encoding_format="float")
        np.testing.assert_allclose(degraded.data[0].embedding, first.data[0].embedding, rtol=0, atol=1e-6)
        assert metric_value(base, "tritonkit_gateway_embedding_cache_errors_total") >= 1


@pytest.fixture
def image_host():
    """An HTTP server on loopback: an image, a redirect to another loopback name, a big body, a slow answer."""
    photo = encode_image(random_image(64, 80, seed=9), "JPEG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            port = self.server.server_address[1]
            if self.path == "/photo.jpg":
                self.answer(photo)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/photo.jpg")
                self.end_headers()
            elif self.path == "/big.jpg":
                self.answer(b"\xff" * (2 * 1024 * 1024))
            elif self.path == "/slow.jpg":
                time.sleep(3)
                self.answer(photo)
            else:
                self.send_error(404)

        def answer(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", photo
    server.shutdown()


def test_url_fetch_is_off_by_default_and_bounded_when_allowed(gateway, image_host):
    host, photo = image_host
    with pytest.raises(openai.BadRequestError, match="start it with --allow-url-fetch"):
        conformance.sdk(base_url=f"{gateway[0]}/v1", api_key=KEY, max_retries=0).embeddings.create(
            model="clip", input=f"{host}/photo.jpg", extra_body={"modality": "image"}
        )
    options = ("--allow-url-fetch", "--url-fetch-host", "127.0.0.1", "--max-fetch-mb", "1", "--fetch-timeout", "1")
    with standalone_gateway(gateway[1], *options) as base:
        sdk = conformance.sdk(base_url=f"{base}/v1", api_key="unused", max_retries=0)

        def embed(url: str):
            return sdk.embeddings.create(model="clip", input=url, extra_body={"modality": "image"}).data[0].embedding

        np.testing.assert_allclose(embed(f"{host}/photo.jpg"), embed(data_url(photo)), rtol=0, atol=1e-6)
        for url, message in (
            (f"{host}/moved", "'localhost' is a private or loopback address"),  # a redirect is checked too
            (f"{host}/big.jpg", "larger than 1048576 bytes"),
            (f"{host}/slow.jpg", "did not answer within 1 s"),
            (f"{host}/missing.jpg", "answered HTTP 404"),
            ("file:///etc/passwd", "file URLs are never read"),
        ):
            with pytest.raises(openai.BadRequestError, match=re.escape(message)):
                embed(url)


def test_subtitles_and_verbose_json_carry_the_served_segments(sdk, gateway, speech_files, tmp_path):
    import srt
    import webvtt

    with TritonkitClient(gateway[1]) as client:
        (want,) = client.transcribe([speech_files[1]], timestamps=True)
    path = tmp_path / "speech.wav"
    path.write_bytes(speech_files[1])
    with path.open("rb") as f:
        verbose = sdk.audio.transcriptions.create(
            model="whisper", file=f, response_format="verbose_json", timestamp_granularities=["segment"]
        )
    assert verbose.text == want.text and verbose.language == "english" and verbose.duration > 0
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (round(s.start, 3), round(s.end, 3), s.text) for s in want.segments
    ]
    assert all(-5 < s.avg_logprob <= 0 and 0 <= s.no_speech_prob <= 1 for s in verbose.segments)
    with path.open("rb") as f:
        subrip = list(srt.parse(sdk.audio.transcriptions.create(model="whisper", file=f, response_format="srt")))
    assert [c.content for c in subrip] == [s.text.strip() for s in want.segments]
    assert all(abs(c.start.total_seconds() - s.start) < 0.002 for c, s in zip(subrip, want.segments))
    with path.open("rb") as f:
        captions = webvtt.from_buffer(
            io.StringIO(sdk.audio.transcriptions.create(model="whisper", file=f, response_format="vtt"))
        )
    assert [c.text for c in captions] == [s.text.strip() for s in want.segments]
    ends = [c.end_in_seconds for c in captions]
    assert ends == sorted(ends) and ends[-1] <= verbose.duration + 0.02


TRANSCRIBE = [sys.executable, "-m", "tritonkit.cli", "transcribe"]


def test_word_granularity_gives_the_served_words(sdk, gateway, speech_files, tmp_path):
    import srt
    import webvtt

    with TritonkitClient(gateway[1]) as client:
        (want,) = client.transcribe([speech_files[1]], word_timestamps=True, timestamps=True)
    assert len(want.words) >= 4
    verbose = sdk.audio.transcriptions.create(
        model="whisper",
        file=("a.wav", speech_files[1]),
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert [(w.word, w.start, w.end) for w in verbose.words] == [
        (w.word.strip(), round(w.start, 3), round(w.end, 3)) for w in want.words
    ]
    assert not verbose.segments  # words alone, as OpenAI answers them
    both = sdk.audio.transcriptions.create(
        model="whisper",
        file=("a.wav", speech_files[1]),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert both.segments and [w.word for w in both.words] == [w.word for w in verbose.words]
    with pytest.raises(openai.BadRequestError, match="needs response_format verbose_json"):
        sdk.audio.transcriptions.create(
            model="whisper", file=("a.wav", speech_files[0]), timestamp_granularities=["segment"]
        )
    # word-level cues through the CLI, read back by a SubRip parser
    path = tmp_path / "speech.wav"
    path.write_bytes(speech_files[1])
    run = subprocess.run(
        [
            *TRANSCRIBE,
            str(path),
            "--format",
            "srt",
            "--max-words-per-cue",
            "2",
            "--url",
            gateway[1],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    cues = list(srt.parse(run.stdout))
    assert len(cues) == (len(want.words) + 1) // 2
    assert " ".join(c.content for c in cues).split() == "".join(w.word for w in want.words).split()
    assert all(c.start <= c.end for c in cues)
    karaoke = subprocess.run(
        [*TRANSCRIBE, str(path), "--format", "vtt", "--highlight-words", "--url", gateway[1]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert karaoke.returncode == 0, karaoke.stderr
    captions = webvtt.from_buffer(io.StringIO(karaoke.stdout))
    assert len(captions) == len(want.words)  # a cue per word, its word underlined
    for caption, word in zip(captions, want.words):
        hours, minutes, seconds = caption.start.split(":")
        start = int(hours) * 3600 + int(minutes) * 60 + float(seconds)  # start_in_seconds drops the milliseconds
        assert f"<u>{word.word.strip()}</u>" in caption.raw_text and abs(start - word.start) < 0.002


def test_streamed_transcription_is_read_by_the_sdk_and_joins_into_the_whole_text(sdk, gateway, long_speech):
    with TritonkitClient(gateway[1]) as client:
        (whole,) = client.transcribe([long_speech])
    events = list(sdk.audio.transcriptions.create(model="whisper", file=("long.wav", long_speech), stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert len(deltas) >= 1 and done.type == "transcript.text.done" and len(events) == len(deltas) + 1
    assert "".join(d.delta for d in deltas) == done.text == whole.text
    assert done.usage.output_tokens == len(whole.tokens) and done.usage.input_tokens == 1500 * 2  # two windows


def test_bench_drives_the_gateway_with_the_same_tool(gateway, speech_files, tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(encode_image(random_image(96, 80, seed=11), "JPEG"))
    speech = tmp_path / "speech.wav"
    speech.write_bytes(speech_files[0])
    env = {**__import__("os").environ, "TRITONKIT_API_KEY": KEY}
    for model, inputs, behind, encoder in (
        ("clip", ["-i", str(image)], "clip_image", "clip_image_encoder"),
        ("clip", ["--text", "a caption"], "clip_text", "clip_text_encoder"),
        ("whisper", ["-i", str(speech)], "whisper", "whisper_encoder"),
        ("llava", ["-i", str(image), "--text", "What is it?"], "llava_chat", "llava_decoder"),
    ):
        report = tmp_path / f"{behind}.json"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tritonkit.cli",
                "bench",
                model,
                "--openai",
                gateway[0],
                *inputs,
                "--concurrency",
                "1,4",
                "--requests",
                "4",
                "--url",
                gateway[1],
                "--json",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        levels = __import__("json").loads(report.read_text())["levels"]
        for level in levels:
            assert level["requests"] == 4 and level["errors"] == 0 and level["throughput"] > 0, level
            assert level["models"][behind]["requests"] == 4 and level["models"][encoder]["requests"] >= 1, behind
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "bench", "nope", "--openai", gateway[0], "--text", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2 and "the gateway serves no model 'nope'" in result.stderr


def test_transcription_temperature_follows_openai(sdk, gateway, speech_files):
    """0 (the default) falls back as OpenAI's thresholds ask, skipping noise; above 0 samples."""
    noise = io.BytesIO()
    soundfile.write(
        noise, np.random.default_rng(2).uniform(-0.3, 0.3, 3 * 16000).astype(np.float32), 16000, format="WAV"
    )
    with TritonkitClient(gateway[1]) as client:
        want = client.transcribe([noise.getvalue()], fallback=True)[0].text
        unskipped = client.transcribe([noise.getvalue()])[0].text
    assert want == "" and unskipped != ""  # the ensemble's default does not skip; OpenAI's API does
    assert sdk.audio.transcriptions.create(model="whisper", file=("noise.wav", noise.getvalue())).text == want
    sampled = sdk.audio.transcriptions.create(
        model="whisper", file=("speech.wav", speech_files[1]), temperature=0.6, response_format="verbose_json"
    )
    assert sampled.segments and {round(s.temperature, 3) for s in sampled.segments} == {0.6}
    with pytest.raises(openai.BadRequestError, match="TEMPERATURE: must be between 0"):
        sdk.audio.transcriptions.create(model="whisper", file=("speech.wav", speech_files[1]), temperature=3)
    quiet = io.BytesIO()
    soundfile.write(quiet, np.zeros(5 * 16000, dtype=np.float32), 16000, format="WAV")
    with TritonkitClient(gateway[1]) as client:
        assert client.transcribe([quiet.getvalue()], temperature=0.5, seed=1)[0].text != ""  # Whisper hallucinates
    filtered = sdk.audio.transcriptions.create(
        model="whisper", file=("quiet.wav", quiet.getvalue()), temperature=0.5, extra_body={"vad_filter": "true"}
    )
    assert filtered.text == ""  # speaches' vad_filter field: nothing but silence, nothing decoded


def test_translation_on_the_multilingual_whisper_equals_the_ensembles(multilingual_whisper_server, speech_files):
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        # temperature 0 at the gateway is OpenAI's fallback schedule; a random model falls back, so seed it
        want = client.transcribe([speech_files[1]], task="translate", fallback=True, seed=3)[0].text
    with standalone_gateway(multilingual_whisper_server.grpc_url) as base:
        sdk = conformance.sdk(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        translated = sdk.audio.translations.create(
            model="whisper", file=("speech.wav", speech_files[1]), extra_body={"seed": "3"}
        )
        with pytest.raises(openai.BadRequestError, match="AUDIO: not a decodable audio file"):
            sdk.audio.translations.create(model="whisper", file=("broken.wav", b"RIFF not audio"))
    assert translated.text == want


def test_openai_schema_deviations_of_wave_2_are_gone(sdk, gateway, speech_files, tmp_path):
    """Issue 37's items 1-5: logprobs and refusal present (null), a streamed bad image is a 400
    (not a 500 the SDK retries twice), "stream": "false" a 400, GET /v1/models/{model}, and
    text/plain for text, srt and vtt."""
    base = gateway[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    image = data_url(encode_image(random_image(64, 80, seed=9), "JPEG"))
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": image}}],
        }
    ]
    body = {"model": "llava", "messages": messages, "max_tokens": 3}
    whole = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120).json()
    choice = whole["choices"][0]
    assert "logprobs" in choice and choice["logprobs"] is None
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    streamed = HTTP.post(f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=120)
    chunks = [json_line for json_line in streamed.text.splitlines() if json_line.startswith("data: {")]
    assert chunks and all('"logprobs": null' in c for c in chunks if '"choices": [{' in c)
    refused = HTTP.post(f"{base}/v1/chat/completions", json={**body, "stream": "false"}, headers=headers, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    bad = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "image_url", "image_url": {"url": data_url(b"not an image")}},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError, match="IMAGE: not a decodable image"):
        list(sdk.chat.completions.create(model="llava", messages=bad, stream=True))
    assert sdk.models.retrieve("llava").id == "llava"
    with pytest.raises(openai.NotFoundError, match="'nope' is not served"):
        sdk.models.retrieve("nope")
    (tmp_path / "a.wav").write_bytes(speech_files[0])
    for response_format in ("text", "srt", "vtt"):
        with open(tmp_path / "a.wav", "rb") as audio:
            answer = HTTP.post(
                f"{base}/v1/audio/transcriptions",
                data={"model": "whisper", "response_format": response_format},
                files={"file": ("a.wav", audio)},
                headers=headers,
                timeout=120,
            )
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain"), response_format


def test_requests_still_running_when_the_grace_period_ends_get_a_clear_error(gateway):
    """SIGTERM to a gateway with a 1 s grace period while long answers run (4 choices of 256 tokens
    each, streamed and in three whole answers):
    each gets `shutting_down` (a 503 in OpenAI's envelope; an error event that ends the stream),
    never a cut connection, and the gateway exits."""
    import json
    import signal

    import httpx

    from tritonkit.gateway import spawn_gateway

    process, base = spawn_gateway(gateway[1], "--grace-seconds", "1")
    body = {
        "model": "llava",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 256,
        "n": 4,
    }
    streaming, answers = threading.Event(), {}

    def stream() -> None:
        url, streamed = f"{base}/v1/chat/completions", {**body, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=streamed) as answer:
            lines = []
            for line in answer.iter_lines():
                lines.append(line)
                if '"content"' in line and '"content": ""' not in line:
                    streaming.set()
            answers["stream"] = (answer.status_code, lines)

    def whole(k: int) -> None:
        answers[k] = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)

    threads = [threading.Thread(target=stream)] + [threading.Thread(target=whole, args=(k,)) for k in range(3)]
    try:
        for thread in threads:
            thread.start()
        assert streaming.wait(30), answers
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn raises the signal again once stopped
    finally:
        if process.poll() is None:
            process.kill()
    for k in range(3):
        assert answers[k].status_code == 503, answers[k].text
        assert answers[k].json()["error"]["code"] == "shutting_down"
        assert "send it again" in answers[k].json()["error"]["message"]
    status, lines = answers["stream"]
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert status == 200 and events[-1] != "[DONE]" and len(events) > 2
    assert json.loads(events[-1])["error"]["code"] == "shutting_down"
