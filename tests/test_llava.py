"""LLaVA image question answering served end to end: a tiny random LlavaForConditionalGeneration
(CLIP vision tower, small Llama, real BPE tokenizer) against transformers `generate`."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests import openai_conformance as conformance
from tests.conftest import encode_image, random_image, runs_until_batched
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.errors import InferenceError
from tritonkit.offline import preprocess

pytestmark = pytest.mark.server
CASES = [
    (1, "What is in the picture?"),
    (2, "Describe the colours."),
    (3, "How many people are there? Answer briefly."),
    (4, "Écris une légende pour cette image."),
]
NEW_TOKENS = 12


def image(seed: int) -> bytes:
    return encode_image(random_image(72 + 8 * seed, 96, seed=seed), "JPEG")


def reference_text(llava_loaded, llava_repository, data: bytes, prompt: str) -> str:
    """transformers `generate` (greedy) on the pixels the served preprocessing computes."""
    spec, loaded = llava_loaded
    pixels = preprocess(llava_repository, "llava_chat", [data])["PIXEL_VALUES"]
    tokens = spec.reference_tokens(loaded, pixels, prompt, NEW_TOKENS)
    return loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True)


def test_greedy_answers_are_the_tokens_of_transformers_generate(llava_server, llava_loaded, llava_repository):
    with TritonkitClient(llava_server.grpc_url) as client:
        for seed, prompt in CASES:
            served = client.chat(image(seed), prompt, max_new_tokens=NEW_TOKENS)
            assert served == reference_text(llava_loaded, llava_repository, image(seed), prompt), prompt


CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A small red boat."},
    {"role": "user", "content": [{"type": "text", "text": "And what colour is the sky?"}]},
]


def test_a_conversation_is_rendered_by_the_chat_template_as_transformers_does(
    llava_server, llava_loaded, llava_repository
):
    spec, loaded = llava_loaded
    pixels = preprocess(llava_repository, "llava_chat", [image(2)])["PIXEL_VALUES"]
    as_parts = [  # what transformers' chat templates read: content as a list of parts
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in CONVERSATION
    ]
    want = loaded.processor.tokenizer.decode(
        spec.reference_tokens(loaded, pixels, as_parts, NEW_TOKENS), skip_special_tokens=True
    )
    with TritonkitClient(llava_server.grpc_url) as client:
        assert client.chat(image(2), CONVERSATION, max_new_tokens=NEW_TOKENS) == want
        assert "".join(client.chat_stream(image(2), CONVERSATION, max_new_tokens=NEW_TOKENS)) == want
        assert want != client.chat(image(2), "What is in the picture?", max_new_tokens=NEW_TOKENS)  # turns count


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "no image here"}], "MESSAGES: exactly one {type: image} part"),
        ([{"role": "tool", "content": "x"}], "MESSAGES[0].role: one of system, user, assistant"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "video"}]}], "MESSAGES[0].content[1]: a {type"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>"}]}], "do not write"),
    ],
)
def test_bad_conversations_fail_their_request_with_a_message(llava_server, messages, message):
    with TritonkitClient(llava_server.grpc_url) as client:
        with pytest.raises(InferenceError, match=re.escape(message)):
            client.chat(image(1), messages)
        assert client.chat(image(1), CASES[0][1], max_new_tokens=2)  # the server is fine


def test_concurrent_requests_decode_together_with_the_same_answers(llava_server):
    def ask(case):
        seed, prompt = case
        with TritonkitClient(llava_server.grpc_url) as client:
            return client.chat(image(seed), prompt, max_new_tokens=NEW_TOKENS)

    with TritonkitClient(llava_server.grpc_url) as client:
        alone = [client.chat(image(seed), prompt, max_new_tokens=NEW_TOKENS) for seed, prompt in CASES]

        def together():
            with ThreadPoolExecutor(max_workers=8) as pool:
                return list(pool.map(ask, CASES * 2))

        runs, batched = runs_until_batched(client, "llava_decoder", together, rows=len(CASES) * 2)
    for run in runs:
        assert run == alone * 2
    assert len(set(alone)) == len(alone)  # the answers depend on the image and prompt
    assert batched, "no run formed a decoder batch of more than one"


def executed_batches(client, model: str) -> dict[int, int]:
    from tritonkit.client import executed_batch_sizes

    return executed_batch_sizes(client.statistics(model), model)


def test_streaming_yields_the_same_text_piece_by_piece(llava_server):
    """Pieces are coalesced (at most every 20 ms unless 8 tokens wait): 12 tokens come in >= 2 pieces."""
    with TritonkitClient(llava_server.grpc_url) as client:
        for seed, prompt in CASES[:2]:
            whole = client.chat(image(seed), prompt, max_new_tokens=NEW_TOKENS)
            pieces = list(client.chat_stream(image(seed), prompt, max_new_tokens=NEW_TOKENS))
            assert "".join(pieces) == whole
            assert 2 <= len(pieces) <= NEW_TOKENS  # piece by piece, not all at the end


def test_sampling_with_a_seed_is_reproducible_alone_and_in_a_batch(llava_server):
    options = dict(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95)
    with TritonkitClient(llava_server.grpc_url) as client:
        greedy = client.chat(image(1), CASES[0][1], max_new_tokens=NEW_TOKENS)
        first = client.chat(image(1), CASES[0][1], seed=7, **options)
        again = client.chat(image(1), CASES[0][1], seed=7, **options)
        other = client.chat(image(1), CASES[0][1], seed=8, **options)

    def ask(seed):
        with TritonkitClient(llava_server.grpc_url) as client:
            return client.chat(image(1), CASES[0][1], seed=seed, **options)

    with ThreadPoolExecutor(max_workers=6) as pool:
        batched = list(pool.map(ask, [7, 8, 9, 7, 8, 9]))
    assert first == again == batched[0] == batched[3]
    assert other == batched[1] == batched[4]
    assert len({first, other, greedy}) == 3


def test_a_stop_string_ends_the_answer_before_it(llava_server):
    with TritonkitClient(llava_server.grpc_url) as client:
        whole = client.chat(image(2), CASES[1][1], max_new_tokens=NEW_TOKENS)
        stop = whole.split()[3]
        cut = client.chat(image(2), CASES[1][1], max_new_tokens=NEW_TOKENS, stop=("zzzz-never", stop))
        streamed = "".join(client.chat_stream(image(2), CASES[1][1], max_new_tokens=NEW_TOKENS, stop=(stop,)))
    assert cut == whole[: whole.find(stop)] == streamed


def metric(server, name: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and s.labels.get("model") == model
    )


def test_a_repeated_image_is_not_encoded_again(llava_server):
    fresh = encode_image(random_image(64, 64, seed=1234), "PNG")
    hits = "tritonkit_feature_cache_hits_total"
    misses = "tritonkit_feature_cache_misses_total"
    before = (metric(llava_server, hits, "llava_vision_encoder"), metric(llava_server, misses, "llava_vision_encoder"))
    with TritonkitClient(llava_server.grpc_url) as client:
        answers = [client.chat(fresh, prompt, max_new_tokens=4) for prompt in ("One?", "Two?", "Three?")]
    after = (metric(llava_server, hits, "llava_vision_encoder"), metric(llava_server, misses, "llava_vision_encoder"))
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    assert len(answers) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "TEMPERATURE: must be between 0 (greedy) and 2, got -1"),
        ({"temperature": 2.5}, "TEMPERATURE: must be between 0 (greedy) and 2, got 2.5"),
        ({"stop": ("x" * 300,)}, "STOP: up to 16 non-empty strings of at most 256 characters"),
        ({"top_p": 0.0}, "TOP_P: must be in (0, 1]"),
        ({"max_new_tokens": 0}, "MAX_NEW_TOKENS: must be between 1 and 256"),
    ],
)
def test_bad_options_fail_their_request_with_a_message(llava_server, options, message):
    with TritonkitClient(llava_server.grpc_url) as client:
        with pytest.raises(InferenceError, match=re.escape(message)):
            client.chat(image(1), "What?", **options)
        with pytest.raises(InferenceError, match=re.escape(message)):
            list(client.chat_stream(image(1), "What?", **options))


def test_a_bad_image_or_prompt_fails_alone(llava_server):
    with TritonkitClient(llava_server.grpc_url) as client:
        with pytest.raises(InferenceError, match="IMAGE: "):
            client.chat(b"%PDF-1.4 not an image", "What?")
        with pytest.raises(InferenceError, match="do not write <image>"):
            client.chat(image(1), "<image> What?")
        with pytest.raises(InferenceError, match="PROMPT or MESSAGES: give exactly one"):
            client.infer("llava_chat", {"IMAGE": pack_byte_rows([image(1)])})
        assert client.chat(image(1), CASES[0][1], max_new_tokens=2)


def test_chat_command_streams_the_answer(llava_server, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(image(3))
    url = llava_server.grpc_url
    args = [
        sys.executable,
        "-m",
        "tritonkit.cli",
        "chat",
        str(path),
        CASES[2][1],
        "--url",
        url,
        "--max-new-tokens",
        "8",
    ]
    streamed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    whole = subprocess.run([*args, "--no-stream"], capture_output=True, text=True, timeout=300)
    assert streamed.returncode == 0 and whole.returncode == 0, streamed.stderr + whole.stderr
    assert streamed.stdout == whole.stdout and len(streamed.stdout.strip()) > 0


def test_chat_command_asks_without_an_image_for_json_and_prints_logprobs(llava_server, tmp_path):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    (tmp_path / "scene.json").write_text(json.dumps(schema))
    base = [sys.executable, "-m", "tritonkit.cli", "chat", "--url", llava_server.grpc_url]
    answer = subprocess.run(
        [*base, "Describe it.", "--json-schema", str(tmp_path / "scene.json"), "--max-new-tokens", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0, answer.stderr
    jsonschema.validate(json.loads(answer.stdout), schema)
    with TritonkitClient(llava_server.grpc_url) as client:
        want = client.chat(None, "Name a colour.", max_new_tokens=5)
    figures = subprocess.run(
        [*base, "Name a colour.", "--max-new-tokens", "5", "--top-logprobs", "2"], capture_output=True, text=True
    )
    lines = figures.stdout.splitlines()
    assert figures.returncode == 0 and lines[0] == want, figures.stderr
    assert 1 <= len(lines) - 1 <= 5 and all(len(line.split("\t")) == 3 for line in lines[1:]), lines
    two = subprocess.run([*base, "Name a colour.", "--max-new-tokens", "5", "--n", "2"], capture_output=True, text=True)
    assert two.returncode == 0 and two.stdout.splitlines() == [f"[0] {want}", f"[1] {want}"], two.stderr
    missing = subprocess.run([*base, "nope.jpg", "Hi"], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.jpg: no such file" in missing.stderr


def test_int8_vision_encoder_is_judged_and_served(tiny_llava_dir, tmp_path):
    import json

    from tritonkit.build import build
    from tritonkit.precision import PrecisionOptions
    from tritonkit.server import TritonServer, free_port

    out = tmp_path / "repo"
    build("llava", str(tiny_llava_dir), out, precision=PrecisionOptions(precision="int8"))
    report = json.loads((out / "llava_vision_encoder" / "1" / "accuracy_report.json").read_text())
    chosen = report["reports"][report["chosen"]]
    assert report["chosen"].startswith("int8") and chosen["passed"]
    server = TritonServer(out, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()).start()
    try:
        server.wait_until_ready(300)
        with TritonkitClient(server.grpc_url) as client:
            assert client.chat(image(1), CASES[0][1], max_new_tokens=4)
    finally:
        server.stop()


def test_gpu_repository_is_written_and_checked(tiny_llava_dir, tmp_path):
    from tritonkit.build import build
    from tritonkit.check import check_repository
    from tritonkit.families.base import BuildOptions
    from tritonkit.repository import read_repository

    out = tmp_path / "repo"
    build("llava", str(tiny_llava_dir), out, options=BuildOptions(target="gpu"))
    configs = read_repository(out)
    assert configs["llava_image_preprocess"].backend == "dali"
    assert configs["llava_vision_encoder"].backend == "onnxruntime"
    assert configs["llava_decoder_stream"].model_transaction_policy.decoupled
    assert configs["llava_decoder"].parameters["device"].string_value == "cuda"
    report = check_repository(out, "gpu")
    assert report.ok, report.errors


def test_chat_names_an_unknown_model_in_one_line(llava_server, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(image(1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "chat",
            str(path),
            "What?",
            "--model",
            "nope",
            "--url",
            llava_server.grpc_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model 'nope_stream' is not available at {llava_server.grpc_url}" in result.stderr  # the streaming ensemble


def test_the_decoder_gives_torch_its_share_of_the_cores_and_reports_it(llava_server, llava_repository):
    """torch takes every core unless told: the decoder sets its threads from the cores and its
    instance count (tritonkit_compute_threads on /metrics; docs/BENCHMARKS.md has the before/after)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from tests.test_model_metrics import scrape
    from tritonkit.engines import instance_threads, usable_cores

    config = text_format.Parse(
        (llava_repository / "llava_decoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    instances = sum(group.count or 1 for group in config.instance_group) or 1
    expected = max(1, usable_cores() // instances)
    reported = {
        labels: v
        for (name, labels), v in scrape(llava_server).items()
        if name == "tritonkit_compute_threads" and ("model", "llava_decoder") in labels
    }
    assert len(reported) == instances and set(reported.values()) == {expected}, reported
    assert all(("library", "torch") in labels for labels in reported)
    # the rule itself: two instances on these cores share them; a parameter overrides it
    two = {"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
    assert instance_threads({}, two) == max(1, usable_cores() // 2)
    assert instance_threads({"intra_op_threads": "3"}, two) == 3


def long_answer_in_background(server, prompt: str, finished: dict) -> threading.Thread:
    """A 256-token image answer streamed in a thread, started once its first piece has come:
    `finished["long"]` is (when it ended, its text)."""
    first_piece = threading.Event()

    def long_answer():
        with TritonkitClient(server.grpc_url) as client:
            pieces = []
            for piece in client.chat_stream(image(1), prompt, model="llava_chat_stream", max_new_tokens=256):
                pieces.append(piece)
                first_piece.set()
            finished["long"] = (time.perf_counter(), "".join(pieces))

    runner = threading.Thread(target=long_answer)
    runner.start()
    assert first_piece.wait(60)
    return runner


def test_a_short_request_sent_during_a_long_answer_is_answered_before_it_with_its_own_text(llava_server):
    """In-flight batching: the short request joins the running answer (the same streaming decoder)
    at the next step instead of waiting for it (the static decoder answered it after the long one)."""
    long_prompt, short_prompt = "Tell me a long story about this picture.", CASES[1][1]
    with TritonkitClient(llava_server.grpc_url) as client:
        long_alone = client.chat(image(1), long_prompt, max_new_tokens=256)
        short_alone = client.chat(image(2), short_prompt, max_new_tokens=8)
    finished: dict[str, tuple[float, str]] = {}
    runner = long_answer_in_background(llava_server, long_prompt, finished)
    with TritonkitClient(llava_server.grpc_url) as client:
        text = "".join(client.chat_stream(image(2), short_prompt, model="llava_chat_stream", max_new_tokens=8))
        finished["short"] = (time.perf_counter(), text)
    runner.join(120)
    assert finished["short"][1] == short_alone and finished["long"][1] == long_alone
    assert len(long_alone.split()) > 40  # long enough to be still running when the short one came
    assert finished["short"][0] < finished["long"][0]


TEXT_TURNS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ],
]


def as_parts(messages: list[dict]) -> list[dict]:
    """Messages as transformers' chat templates read them: content as a list of parts."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in messages
    ]


def test_a_turn_without_an_image_equals_transformers_and_joins_a_running_image_answer(llava_server, llava_loaded):
    """NAME_chat_text(_stream): the language model alone, tokens equal to transformers `generate`
    on the same conversation; its rows share the decoder's steps with image turns (a short text
    turn sent during a long image answer is answered first, with its own text)."""
    spec, loaded = llava_loaded
    tokenizer = loaded.processor.tokenizer
    wants = [
        tokenizer.decode(spec.reference_tokens(loaded, None, as_parts(turn), NEW_TOKENS), skip_special_tokens=True)
        for turn in TEXT_TURNS
    ]
    assert len(set(wants)) == len(wants)
    question = "What is the capital of France?"
    want_prompt = tokenizer.decode(spec.reference_tokens(loaded, None, question, NEW_TOKENS), skip_special_tokens=True)
    with TritonkitClient(llava_server.grpc_url) as client:
        for turn, want in zip(TEXT_TURNS, wants):
            assert client.chat(None, turn, max_new_tokens=NEW_TOKENS) == want
        assert "".join(client.chat_stream(None, TEXT_TURNS[0], max_new_tokens=NEW_TOKENS)) == wants[0]
        assert client.chat(None, question, max_new_tokens=NEW_TOKENS) == want_prompt
        with pytest.raises(InferenceError, match=re.escape("MESSAGES: no {type: image} part")):
            client.chat(None, [{"role": "user", "content": [{"type": "image"}]}])
        long_alone = client.chat(image(1), "Tell me a long story about this picture.", max_new_tokens=256)
    finished: dict[str, tuple[float, str]] = {}
    runner = long_answer_in_background(llava_server, "Tell me a long story about this picture.", finished)
    with TritonkitClient(llava_server.grpc_url) as client, ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda turn: client.chat(None, turn, max_new_tokens=NEW_TOKENS), TEXT_TURNS))
        finished["text"] = (time.perf_counter(), texts[0])
    runner.join(120)
    assert texts == wants and finished["long"][1] == long_alone
    assert finished["text"][0] < finished["long"][0]


def reference_logprobs(llava_loaded, pixels, prompt: str, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """transformers `generate(output_logits=True)`: each new token, its log-softmax and the `top` likeliest."""
    import torch

    _, loaded = llava_loaded
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    ids = loaded.processor.tokenizer(text.replace("<image>", "<image>" * loaded.image_tokens), return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=ids["input_ids"],
            attention_mask=torch.ones_like(ids["input_ids"]),
            pixel_values=torch.from_numpy(pixels),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
    found = []
    for token, logits in zip(tokens, out.logits):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        values, best = logprobs.topk(top)
        found.append((token, float(logprobs[token]), list(zip(best.tolist(), values.tolist()))))
    return [entry for entry in found if entry[0] not in _eos_ids(loaded)]


def _eos_ids(loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def test_logprobs_equal_transformers_whole_and_streamed(llava_server, llava_loaded, llava_repository):
    """TOP_LOGPROBS: each token's logprob and its 3 likeliest from the decoder's log-softmax, equal
    to transformers' within 1e-4, whole and streamed (each piece carrying its own tokens')."""
    import json

    from tritonkit.client import chat_inputs

    _, loaded = llava_loaded
    tokenizer = loaded.processor.tokenizer
    prompt = CASES[0][1]
    pixels = preprocess(llava_repository, "llava_chat", [image(1)])["PIXEL_VALUES"]
    want = reference_logprobs(llava_loaded, pixels, prompt, 3)
    with TritonkitClient(llava_server.grpc_url) as client:
        inputs = chat_inputs(image(1), prompt, max_new_tokens=NEW_TOKENS, top_logprobs=3)
        outputs = client.infer("llava_chat", inputs)
        plain = client.infer("llava_chat", chat_inputs(image(1), prompt, max_new_tokens=NEW_TOKENS))
        streamed = stream_outputs(client, "llava_chat_stream", inputs)
    assert plain["LOGPROBS"][0, 0] == b""  # not asked for: nothing
    whole = json.loads(outputs["LOGPROBS"][0, 0])
    pieces = [entry for response in streamed for entry in json.loads(response["LOGPROBS"][0, 0] or b"[]")]
    for got in (whole, pieces):
        assert len(got) == len(want) == int(outputs["COMPLETION_TOKENS"][0, 0])
        for entry, (token, logprob, best) in zip(got, want):
            assert entry["token"] == tokenizer.decode([token]) and entry["bytes"] == list(entry["token"].encode())
            assert abs(entry["logprob"] - logprob) < 1e-4
            assert [tokenizer.decode([t]) for t, _ in best] == [alt["token"] for alt in entry["top_logprobs"]]
            assert np.allclose([lp for _, lp in best], [alt["logprob"] for alt in entry["top_logprobs"]], atol=1e-4)
    assert "".join(tokenizer.decode([t]) for t, _, _ in want) == outputs["TEXT"][0, 0].decode()


def stream_outputs(client, model: str, inputs: dict) -> list[dict]:
    """Every response of one streamed request, as numpy outputs."""
    import queue

    import tritonclient.grpc as grpcclient

    from tritonkit.dtypes import wire_datatype

    tensors = []
    for name, array in inputs.items():
        tensors.append(grpcclient.InferInput(name, list(array.shape), wire_datatype(array)))
        tensors[-1].set_data_from_numpy(array)
    answers: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(client.url)
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    found = []
    try:
        grpc.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            result, error = answers.get(timeout=120)
            assert error is None, error
            response = result.get_response(as_json=True)
            names = [o["name"] for o in response.get("outputs", [])]
            if names:
                found.append({name: result.as_numpy(name) for name in names})
            if response.get("parameters", {}).get("triton_final_response", {}).get("bool_param"):
                return found
    finally:
        grpc.stop_stream()
        grpc.close()


def test_a_full_decoder_refuses_at_once_and_the_gateway_says_429_with_retry_after(llava_repository, tmp_path):
    """One answer in flight and one waiting at most: the rest of a burst is refused with
    UNAVAILABLE naming the wait, which the OpenAI gateway answers with 429 and Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from tests.conftest import copy_with_parameters, start_server
    from tests.test_openai_gateway import standalone_gateway
    from tritonkit.chat_loop import BUSY_MARK

    bounds = {"max_rows_in_flight": "1", "max_queued": "1"}
    repository = copy_with_parameters(llava_repository, "llava_decoder", bounds, tmp_path / "model_repository")
    server = start_server(repository)
    try:

        def ask(seed: int):
            with TritonkitClient(server.grpc_url) as client:
                try:
                    return client.chat(image(seed), "Tell me a long story.", max_new_tokens=200)
                except InferenceError as exc:
                    return exc

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(ask, range(1, 7)))
        refused = [o for o in outcomes if isinstance(o, InferenceError)]
        assert refused and len(refused) < len(outcomes), outcomes
        assert all(BUSY_MARK in str(o) for o in refused), refused
        with standalone_gateway(server.grpc_url) as base:
            sdk = conformance.sdk(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            image_url = "data:image/jpeg;base64," + __import__("base64").b64encode(image(1)).decode()

            def chat(_):
                try:
                    return sdk.chat.completions.with_raw_response.create(
                        model="llava",
                        max_tokens=200,
                        messages=[
                            {
                                "role": "user",
                                "content": [
                                    {"type": "text", "text": "Tell me a long story."},
                                    {"type": "image_url", "image_url": {"url": image_url}},
                                ],
                            }
                        ],
                    )
                except openai.APIStatusError as exc:
                    return exc

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(chat, range(6)))
        limited = [a for a in answers if isinstance(a, openai.RateLimitError)]
        assert limited and all(a.response.headers.get("retry-after") == "1" for a in limited), answers
        assert all(BUSY_MARK in a.message for a in limited)
        assert not any(isinstance(a, openai.APIStatusError) and a.status_code != 429 for a in answers), answers
        with TritonkitClient(server.grpc_url) as client:  # and the decoder answers once the burst is over
            assert client.chat(image(1), "Fine?", max_new_tokens=2)
    finally:
        server.stop()
