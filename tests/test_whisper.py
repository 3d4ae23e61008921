"""Whisper tiny.en (real weights) converted from CTranslate2 and served end to end."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile

from tritonkit.client import TritonkitClient, executed_batch_sizes, pack_byte_rows
from tritonkit.errors import InferenceError
from tritonkit.metrics import wer
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
    with TritonkitClient(whisper_server.grpc_url) as client:
        single = [client.infer("whisper", {"AUDIO": pack_byte_rows([d])}) for d in speech_files]
        before = executed_batch_sizes(client.statistics("whisper_decoder"), "whisper_decoder")

    def call(data):
        with TritonkitClient(whisper_server.grpc_url) as c:
            return c.infer("whisper", {"AUDIO": pack_byte_rows([data])})

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(call, speech_files * 2))
    for i, result in enumerate(concurrent):
        want = single[i % len(single)]
        assert result["TEXT"][0, 0] == want["TEXT"][0, 0]
        assert served_tokens(result) == served_tokens(want)
    with TritonkitClient(whisper_server.grpc_url) as client:
        after = executed_batch_sizes(client.statistics("whisper_decoder"), "whisper_decoder")
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), after


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
