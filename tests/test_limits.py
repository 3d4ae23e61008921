"""Every input and option is limited before work starts, and messages stay small (real tritonserver).

What a hostile client once did to the server (issue: "No request takes the server down"): a tiny
sampling temperature, a 100 KB prompt, a 1x20000 image and 20 KB option strings."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import encode_image, random_image
from tritonkit.chat_decoding import DEFAULT_MAX_PROMPT_BYTES, chat_prompt
from tritonkit.client import TritonkitClient, whisper_inputs
from tritonkit.errors import MAX_MESSAGE_CHARS, InferenceError, bounded, shown

pytestmark = pytest.mark.server


def photo(seed: int) -> bytes:
    return encode_image(random_image(80, 96, seed=seed), "JPEG")


def error_of(call) -> str:
    with pytest.raises(InferenceError) as caught:
        call()
    return str(caught.value)


def test_shown_values_and_messages_are_cut():
    assert shown("fr") == "'fr'"
    assert shown("x" * 20_000) == "'" + "x" * 36 + "... (20000 characters)"
    assert len(bounded("y" * 50_000)) <= MAX_MESSAGE_CHARS and bounded("y" * 50_000).endswith("... [49020 more]")
    assert bounded("short") == "short"


def test_a_tiny_temperature_decodes_greedily_beside_sampled_batch_mates(llava_server):
    """1e-40 once overflowed the logits, failed its batch and crashed tritonserver."""
    url = llava_server.grpc_url

    def ask(options):
        with TritonkitClient(url) as client:
            return client.chat(photo(1), "What is it?", max_new_tokens=8, **options)

    with TritonkitClient(url) as client:
        greedy = client.chat(photo(1), "What is it?", max_new_tokens=8)
    cases = [{"temperature": 1e-40}, *[{"temperature": 0.7, "seed": seed} for seed in range(3)]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, cases * 2))
    assert answers[0] == answers[4] == greedy
    assert all(answers[1:4]) and answers[1:4] == answers[5:8]  # seeded sampling, unharmed
    assert llava_server.process.poll() is None and llava_server.is_ready()


def test_a_prompt_over_the_byte_limit_fails_before_tokenizing(llava_server):
    began = time.monotonic()
    with TritonkitClient(llava_server.grpc_url) as client:
        message = error_of(lambda: client.chat(photo(2), "a" * 100_000))
    assert (
        f"PROMPT: 100000 bytes exceeds the {DEFAULT_MAX_PROMPT_BYTES} byte limit (max_prompt_bytes; rebuild with "
        "--max-prompt-bytes to change it)" in message
    )
    assert time.monotonic() - began < 10


def context_budget(llava_loaded, prompt: str) -> tuple[int, int, int]:
    """(prompt tokens, image tokens, context length) as the decoder counts them."""
    _, loaded = llava_loaded
    ids = loaded.processor.tokenizer(chat_prompt(loaded.processor, prompt))["input_ids"]
    return len(ids) - 1, loaded.image_tokens, loaded.model.config.text_config.max_position_embeddings


def test_a_prompt_longer_than_the_context_fails_with_its_token_count(llava_server, llava_loaded):
    prompt = "word " * 3000  # within the byte limit, beyond the context
    tokens, image_tokens, context = context_budget(llava_loaded, prompt)
    assert tokens + image_tokens > context
    with TritonkitClient(llava_server.grpc_url) as client:
        message = error_of(lambda: client.chat(photo(3), prompt))
        assert (
            f"PROMPT: {tokens} prompt tokens + {image_tokens} image tokens + 1 new tokens exceed the model's "
            f"{context}-token context; shorten the prompt" in message
        )
        assert client.chat(photo(3), "What?", max_new_tokens=2)


def test_max_new_tokens_must_fit_beside_the_prompt_and_the_default_is_cut_to_fit(llava_server, llava_loaded):
    _, image_tokens, context = context_budget(llava_loaded, "")
    words = 1
    while sum(context_budget(llava_loaded, "word " * words)[:2]) < context - 100:  # 100 tokens left
        words += 50
    prompt = "word " * words
    tokens, _, _ = context_budget(llava_loaded, prompt)
    left = context - tokens - image_tokens
    with TritonkitClient(llava_server.grpc_url) as client:
        message = error_of(lambda: client.chat(photo(4), prompt, max_new_tokens=left + 1))
        assert (
            f"+ {left + 1} new tokens exceed the model's {context}-token context; shorten the prompt or lower "
            "MAX_NEW_TOKENS" in message
        )
        assert client.chat(photo(4), prompt, max_new_tokens=1) is not None
        client.chat(photo(4), prompt)  # the default (256) is cut to what is left: no error


def test_an_elongated_image_fails_alone_before_its_resize(clip_server):
    strip = encode_image(random_image(1, 20000, seed=5), "PNG")

    def embed(data):
        with TritonkitClient(clip_server.grpc_url) as client:
            try:
                return client.embed_images([data]).shape
            except InferenceError as exc:
                return str(exc)

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(embed, [strip, photo(6), photo(7), photo(8)]))
    assert "IMAGE: 20000x1 is too elongated: its resize to" in results[0]
    assert "exceeds the 16000000 pixel limit (max_resize_pixels)" in results[0]
    assert all(isinstance(r, tuple) for r in results[1:]), results
    assert time.monotonic() - began < 15


@pytest.mark.parametrize("option", ["LANGUAGE", "TASK"])
def test_an_oversized_option_string_gets_a_short_message_naming_it(whisper_server, speech_files, option):
    """A 20 KB value once made an error larger than gRPC's trailer limit ("Stream removed")."""
    inputs = whisper_inputs(speech_files[0], **{option.lower(): "q" * 20_000})
    with TritonkitClient(whisper_server.grpc_url) as client:
        message = error_of(lambda: client.infer("whisper", inputs))
        assert f"'whisper', {option}: 'qqqq" in message and "(20000 characters)" in message, message[:300]
        assert len(message) < 300
        assert client.transcribe([speech_files[0]])[0].text


def test_the_request_byte_limit_is_written_to_the_models_that_read_client_tensors(clip_repository):
    from tritonkit.repository import read_repository
    from tritonkit.triton_config import parameter

    configs = read_repository(clip_repository)
    limits = {
        name: parameter(config, "max_request_bytes") for name, config in configs.items() if config.backend == "python"
    }
    assert limits == {
        "clip_image_preprocess": str(64 * 1024 * 1024),
        "clip_text_tokenizer": str(64 * 1024 * 1024),
        "clip_image_encoder": None,
        "clip_text_encoder": None,
    }
