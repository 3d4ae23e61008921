"""The in-flight Whisper step loop in process: every window decodes to the static decoder's tokens
and figures (which the served tests hold to transformers) whatever joins or leaves — greedy,
timestamps, beam search, seeded sampling, fallback, prompts — plus cancellation and the queue
bound. Whisper tiny.en (real weights) over the decoder graphs of a built repository."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from tritonkit import whisper_loop
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.step_loop import BUSY_MARK, CancelledError, QueueFull, wait_all
from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings, WindowDecoder
from tritonkit.whisper_loop import WhisperLoop, WindowJob, wait_windows

OPTIONS = [
    DecodeOptions(),
    DecodeOptions(timestamps=True),
    DecodeOptions(beam_size=5),
    DecodeOptions(temperature=0.7, seed=3),
    DecodeOptions(fallback=True, timestamps=True, seed=11),
    DecodeOptions(prompt="Coffee, trains and the weather.", max_new_tokens=12),
    DecodeOptions(beam_size=3, timestamps=True, length_penalty=0.5),
    DecodeOptions(fallback=True, seed=5, beam_size=2),
]


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options)


@pytest.fixture(scope="module")
def decoder(whisper_repository, whisper_loaded):
    from tritonkit.triton_config import parse_text

    folder = whisper_repository / "whisper_decoder"
    parameters = {k: v.string_value for k, v in parse_text((folder / "config.pbtxt").read_text()).parameters.items()}
    version = folder / "1"
    settings = DecodeSettings.from_json(parameters["decode_settings"])
    tokenizer = whisper_loaded[1].processor.tokenizer
    return WindowDecoder(
        session(version / parameters.get("cross_kv_file", "cross_kv.onnx")),
        session(version / parameters.get("step_file", "step.onnx")),
        settings,
        prompt_ids=lambda text: [int(t) for t in tokenizer.get_prompt_ids(text)],
        text_of=lambda tokens: tokenizer.decode(
            [t for t in tokens if t < settings.timestamp_begin], skip_special_tokens=True
        ),
    )


@pytest.fixture(scope="module")
def windows(whisper_repository, whisper_loaded, speech_files):
    """Encoder outputs of spoken clips and of noise (which makes the fallback decode again)."""
    encoder = session(whisper_repository / "whisper_encoder" / "1" / "model.onnx")
    extractor = whisper_loaded[1].processor.feature_extractor
    clips = [decode_audio(data, AudioRecipe()) for data in speech_files[:6]]
    clips.append(np.random.default_rng(0).standard_normal(5 * SAMPLE_RATE).astype(np.float32) * 0.3)
    clips.append(clips[1][:SAMPLE_RATE])  # a second of speech: a short window among long ones
    features = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    return encoder.run(None, {encoder.get_inputs()[0].name: features.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def alone(decoder, windows):
    """Each window decoded alone by the static decoder: tokens and OpenAI's figures."""
    results = []
    for k, hidden in enumerate(windows):
        tokens, _ = decoder.decode(hidden[None], [OPTIONS[k % len(OPTIONS)]])
        results.append((tokens[0], decoder.sum_logprobs[0], decoder.temperatures[0], decoder.no_speech_probs[0]))
    return results


def jobs(windows):
    return [{"hidden": h, "options": OPTIONS[k % len(OPTIONS)]} for k, h in enumerate(windows)]


def assert_same(results, alone):
    for k, (result, (tokens, sum_logprob, temperature, no_speech)) in enumerate(zip(results, alone)):
        assert not isinstance(result, Exception), result
        assert result.tokens == tokens, (k, OPTIONS[k % len(OPTIONS)])
        assert result.temperature == temperature
        assert result.sum_logprob == pytest.approx(sum_logprob, abs=2e-3)
        assert np.isnan(no_speech) == np.isnan(result.no_speech_prob)
        if not np.isnan(no_speech):
            assert result.no_speech_prob == pytest.approx(no_speech, abs=1e-4)


def test_windows_equal_the_static_decoders_together_staggered_and_queued(decoder, windows, alone, monkeypatch):
    """Three windows at a time (the rest queued), then arrivals staggered so rows join caches
    longer and shorter than their prompts, with padding dropped as soon as no row needs it."""
    monkeypatch.setattr(whisper_loop, "TRIM_COLUMNS", 1)
    loop = WhisperLoop(decoder, max_rows=3)
    try:
        assert_same(wait_windows(loop, jobs(windows)), alone)
        submitted = itertools.count()

        def staggered(fields, on_done, on_error):
            loop.submit(WindowJob(on_done=on_done, on_error=on_error, **fields))
            time.sleep(0.03 * (next(submitted) % 3))

        results = wait_all(staggered, jobs(windows), 300)
        assert_same(results, alone)
        assert any(r.temperature > 0 for r in results if r.tokens is not None)  # the noise fell back
    finally:
        loop.stop()


def test_a_cancelled_window_frees_its_row_and_the_others_finish(decoder, windows, alone):
    loop = WhisperLoop(decoder, max_rows=4, cancel_check_s=0)
    cancelled = threading.Event()
    failures: list = []
    try:
        loop.submit(
            WindowJob(
                windows[0],
                DecodeOptions(beam_size=5),
                on_done=failures.append,
                on_error=failures.append,
                cancelled=cancelled.is_set,
            )
        )
        cancelled.set()
        others = wait_windows(loop, jobs(windows)[:3])
        assert [r.tokens for r in others] == [a[0] for a in alone[:3]]
        assert len(failures) == 1 and isinstance(failures[0], CancelledError)
        assert loop.windows == 0
    finally:
        loop.stop()


def test_a_full_queue_refuses_a_request_with_a_retry_message(decoder, windows):
    loop = WhisperLoop(decoder, max_rows=1, max_queued=1)
    try:
        blocker = threading.Event()
        answers: list = []

        def slow(result):  # holds the loop's thread: what is submitted meanwhile stays queued
            blocker.wait(30)
            answers.append(result)

        loop.submit(WindowJob(windows[0], DecodeOptions(max_new_tokens=1), on_done=slow, on_error=answers.append))
        time.sleep(0.5)
        loop.submit(WindowJob(windows[1], DecodeOptions(), on_done=answers.append, on_error=answers.append))
        with pytest.raises(QueueFull, match=BUSY_MARK):
            loop.submit(WindowJob(windows[2], DecodeOptions(), on_done=answers.append, on_error=answers.append))
        blocker.set()
        deadline = time.monotonic() + 60
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == 2 and not any(isinstance(a, Exception) for a in answers)
    finally:
        loop.stop()


def test_a_window_that_cannot_be_admitted_fails_alone(decoder, windows, alone):
    """A PROMPT of more tokens than half the context fails its window with its own message while
    the windows admitted with it decode as alone."""
    from tritonkit.errors import InputError

    loop = WhisperLoop(decoder, max_rows=8)
    try:
        long_prompt = {"hidden": windows[2], "options": DecodeOptions(prompt="coffee and trains " * 100)}
        results = wait_windows(loop, [jobs(windows)[0], long_prompt, jobs(windows)[1]])
        assert isinstance(results[1], InputError) and "PROMPT" in str(results[1]) and "token limit" in str(results[1])
        assert [results[0].tokens, results[2].tokens] == [alone[0][0], alone[1][0]]
    finally:
        loop.stop()
