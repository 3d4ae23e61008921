"""The in-flight chat step loop in process: answers equal the static decoder's (which the served
tests hold to transformers `generate`) whatever joins or leaves, cancellation, the queue bound and
incremental detokenization. The tiny LLaVA's language model (random weights, real BPE tokenizer)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tritonkit import chat_loop
from tritonkit.chat_decoding import ChatGenerator, ChatOptions, chat_prompt
from tritonkit.chat_loop import BUSY_MARK, CancelledError, ChatJob, ChatLoop, IncrementalText, QueueFull, wait_answers

QUESTIONS = ["What is in the picture?", "Describe the colours.", "How many people? Answer briefly.", "A long story."]
LIMITS = [8, 48, 24, 96]


@pytest.fixture(scope="module")
def generator(llava_loaded):
    """One torch thread, as a decoder instance on its share of the cores; the test process's own
    count is restored after (later tests build and compare numbers in this process)."""
    import torch

    from tritonkit.families.llava import language_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, loaded = llava_loaded
    tokenizer = loaded.processor.tokenizer
    yield ChatGenerator(
        language_model(loaded.model), tokenizer, loaded.model.config.image_token_id, [tokenizer.eos_token_id]
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jobs(generator, llava_loaded):
    _, loaded = llava_loaded
    rng = np.random.default_rng(0)
    tokens = 16  # image features per image (any count: they replace as many image tokens)
    hidden = generator.lm.config.hidden_size
    made = []
    for k in range(8):
        ids = generator.prompt_ids(chat_prompt(loaded.processor, QUESTIONS[k % 4] + " " * (k // 4)), tokens)
        options = ChatOptions(max_new_tokens=LIMITS[k % 4], temperature=0.8 if k == 5 else 0.0, seed=k)
        made.append(
            {
                "features": rng.standard_normal((tokens, hidden)).astype(np.float32),
                "prompt_ids": ids,
                "options": options,
            }
        )
    return made


@pytest.fixture(scope="module")
def alone(generator, jobs):
    """Each job generated alone by the static decoder."""
    return [generator.generate([j["features"]], [j["prompt_ids"]], [j["options"]], 256)[0] for j in jobs]


def test_answers_equal_the_static_decoders_together_staggered_and_queued(generator, jobs, alone, monkeypatch):
    """Two rows at a time (the rest queued), arrivals staggered, and so few KV columns at first that
    the cache drops unused columns and grows while rows run: every answer as generated alone."""
    monkeypatch.setattr(chat_loop, "FIRST_COLUMNS", 8)
    loop = ChatLoop(generator, 256, max_rows=2)
    try:
        together = wait_answers(loop, jobs)
        results: list = [None] * len(jobs)
        done = threading.Event()

        def finish(k):
            def store(value):
                results[k] = value
                if all(r is not None for r in results):
                    done.set()

            return store

        for k, job in enumerate(jobs):
            loop.submit(ChatJob(on_done=finish(k), on_error=finish(k), **job))
            time.sleep(0.01 * (k % 3))
        assert done.wait(300)
    finally:
        loop.stop()
    for run in (together, results):
        for answer, reference in zip(run, alone):
            assert not isinstance(answer, Exception), answer
            assert answer.tokens == reference.tokens and answer.text == reference.text
            assert answer.reason == reference.reason
    assert {a.reason for a in together} == {"length"}  # every answer ran to its own limit: rows left at each


def test_a_short_answer_is_not_held_up_by_a_long_one(generator, jobs, alone):
    loop = ChatLoop(generator, 256, max_rows=4)
    finished: dict[str, float] = {}
    events = {name: threading.Event() for name in ("long", "short")}
    try:
        for name, job in (("long", jobs[3]), ("short", jobs[0])):

            def done(answer, name=name):
                finished[name] = time.perf_counter()
                events[name].set()

            loop.submit(ChatJob(on_done=done, on_error=done, **job))
            time.sleep(0.05)
        assert all(e.wait(120) for e in events.values())
    finally:
        loop.stop()
    assert finished["short"] < finished["long"]  # 8 tokens answered while the 96-token answer runs


def test_a_cancelled_request_leaves_at_the_next_check_and_its_batch_mates_go_on(generator, jobs, alone):
    loop = ChatLoop(generator, 256, max_rows=4, cancel_check_s=0.0)
    cancel = threading.Event()
    outcome: dict = {}
    pieces: list[str] = []

    def text(piece, answer):
        pieces.append(piece)
        if len(answer.tokens) >= 5:
            cancel.set()

    try:
        cancelled = ChatJob(
            on_done=lambda a: outcome.setdefault("long", a),
            on_error=lambda e: outcome.setdefault("long", e),
            on_text=text,
            cancelled=cancel.is_set,
            **jobs[3],
        )
        loop.submit(cancelled)
        (mate,) = wait_answers(loop, [jobs[1]])
    finally:
        loop.stop()
    assert isinstance(outcome["long"], CancelledError)
    assert len("".join(pieces).split()) >= 5 or pieces  # it had started
    assert mate.tokens == alone[1].tokens
    assert not loop.rows


def test_past_the_queue_bound_a_request_is_refused_at_once_with_a_retry_message(generator, jobs):
    loop = ChatLoop(generator, 256, max_rows=1, max_queued=1)
    answers: list = []
    try:
        refused = None
        for k, job in enumerate([jobs[3]] * 4):
            while k == 1 and not loop.rows:  # the first is being answered; the second waits; more are refused
                time.sleep(0.001)
            try:
                loop.submit(ChatJob(on_done=answers.append, on_error=answers.append, **job))
            except QueueFull as exc:
                refused = exc
        deadline = time.monotonic() + 120
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert refused is not None and str(refused).endswith(BUSY_MARK)
    assert len(answers) >= 2 and all(not isinstance(a, Exception) for a in answers)


def test_incremental_text_is_the_full_decode_of_every_prefix(generator):
    """Random token ids (words, pieces of multi-byte characters, specials): after each token the
    text so far is a prefix of decoding them all, and equals it whenever no character is unfinished."""
    tokenizer = generator.tokenizer
    rng = np.random.default_rng(1)
    for trial in range(5):
        tokens = [int(t) for t in rng.integers(0, len(tokenizer), 120)]
        if trial == 0:
            tokens = tokenizer("héllo wörld — 日本語のテキスト 🚀 done")["input_ids"]
        text = IncrementalText(tokenizer)
        for k in range(1, len(tokens) + 1):
            got = text.add(tokens[:k])
            full = tokenizer.decode(tokens[:k], skip_special_tokens=True)
            assert full.startswith(got), (k, got, full)
            if not full.endswith("\ufffd"):
                assert got == full, (k, got, full)


@pytest.mark.gpu
def test_the_loop_on_cuda_gives_the_static_decoders_answers(llava_loaded, jobs):
    """GPU repositories run the same loop with the language model on CUDA (never run here: no GPU)."""
    import torch

    from tritonkit.families.llava import language_model

    _, loaded = llava_loaded
    tokenizer = loaded.processor.tokenizer
    lm = language_model(loaded.model).to("cuda")
    on_gpu = ChatGenerator(lm, tokenizer, loaded.model.config.image_token_id, [tokenizer.eos_token_id], "cuda")
    alone = [on_gpu.generate([j["features"]], [j["prompt_ids"]], [j["options"]], 256)[0] for j in jobs[:4]]
    loop = ChatLoop(on_gpu, 256, max_rows=2)
    try:
        answers = wait_answers(loop, jobs[:4])
    finally:
        loop.stop()
    assert [a.tokens for a in answers] == [r.tokens for r in alone]
    assert torch.cuda.is_available()


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "outdoor": {"type": "boolean"},
    },
    "required": ["name", "colour", "count", "tags", "outdoor"],
    "additionalProperties": False,
}


def test_structured_rows_answer_valid_json_of_their_schema_beside_free_rows(generator, jobs, alone):
    """A batch that mixes rows constrained by a JSON schema (greedy and sampled), a JSON-object row
    and free rows: every constrained answer parses and validates against its schema (the random
    model left alone writes no JSON at all), the free rows answer as they do alone."""
    import json

    import jsonschema

    from tritonkit.chat_decoding import response_grammar

    schema_format = json.dumps({"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}})
    grammar = response_grammar(schema_format)
    object_grammar = response_grammar(json.dumps({"type": "json_object"}))
    constrained = [
        {**jobs[0], "options": ChatOptions(max_new_tokens=200, grammar=grammar)},
        {**jobs[1], "options": ChatOptions(max_new_tokens=200, temperature=0.9, seed=3, grammar=grammar)},
        {**jobs[2], "options": ChatOptions(max_new_tokens=200, grammar=object_grammar)},
    ]
    free = [jobs[3], jobs[4]]
    loop = ChatLoop(generator, 256, max_rows=8)
    try:
        answers = wait_answers(loop, [*constrained, *free])
    finally:
        loop.stop()
    for answer in answers[:2]:
        jsonschema.validate(json.loads(answer.text), SCHEMA)
        assert answer.reason == "stop"
    # a random model may write one endless string: cut by its limit, the JSON object so far is a prefix the grammar allows
    if answers[2].reason == "stop":
        assert isinstance(json.loads(answers[2].text), dict)
    else:
        assert answers[2].reason == "length" and answers[2].text.startswith("{")
        matcher = generator.matcher(object_grammar)
        assert all(matcher.consume_token(t) for t in answers[2].tokens) and not matcher.is_error()
    assert [a.text for a in answers[3:]] == [alone[3].text, alone[4].text]
    with pytest.raises(json.JSONDecodeError):
        json.loads(alone[0].text)  # unconstrained, the same row is no JSON


@pytest.mark.parametrize(
    "response_format, message",
    [
        ('{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}', "x cannot constrain"),
        ('{"type": "xml"}', "type must be text, json_object or json_schema"),
        ("not json", "RESPONSE_FORMAT: not JSON"),
    ],
)
def test_a_response_format_that_cannot_constrain_is_a_clear_input_error(response_format, message):
    from tritonkit.chat_decoding import response_grammar
    from tritonkit.errors import InputError

    with pytest.raises(InputError, match=message):
        response_grammar(response_format)


def test_choices_of_one_prompt_share_one_prefill_and_answer_as_alone(generator, jobs, alone, monkeypatch):
    """OpenAI's `n`: rows of the same prompt and image admitted together are prefilled once, and
    each answers as it does alone (greedy, and sampled with its own seed)."""
    prefilled: list[int] = []
    original = generator.prefill

    def counting(features, prompts, grids=None):
        prefilled.append(len(prompts))
        return original(features, prompts, grids)

    monkeypatch.setattr(generator, "prefill", counting)
    sampled = [
        {
            **jobs[2],
            "features": jobs[2]["features"].copy(),
            "options": ChatOptions(max_new_tokens=24, temperature=0.9, seed=s),
        }
        for s in (11, 12, 13)
    ]
    loop = ChatLoop(generator, 256, max_rows=8)
    try:
        answers = wait_answers(loop, [jobs[0], jobs[0], *sampled], together=True)
    finally:
        loop.stop()
    assert sum(prefilled) == 2, prefilled  # two distinct prompts among five rows
    monkeypatch.setattr(generator, "prefill", original)
    assert answers[0].text == answers[1].text == alone[0].text
    each = [generator.generate([j["features"]], [j["prompt_ids"]], [j["options"]], 256)[0].text for j in sampled]
    assert [a.text for a in answers[2:]] == each and len(set(each)) > 1
