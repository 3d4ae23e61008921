"""The speaker family: resemblyzer's trained GE2E encoder, exported and served (NAME_audio).

The reference is the package itself: `resemblyzer.preprocess_wav` and `VoiceEncoder.embed_utterance`
on the same files. Voices: espeak-ng's, several of them, as WAV at 22.05 kHz and as stereo FLAC at
44.1 kHz."""

from __future__ import annotations

import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_server
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.errors import InferenceError
from tritonkit.samples import SENTENCES
from tritonkit.samples import VOICES as SAMPLE_VOICES

VOICES = SAMPLE_VOICES[:3]  # (espeak-ng voice, speed): different speakers for the encoder


def voice_clip(text: str, voice: tuple[str, str], path: Path) -> bytes:
    subprocess.run(["espeak-ng", "-v", voice[0], "-s", voice[1], "-w", str(path), text], check=True)
    return path.read_bytes()


def stereo_flac(wav: bytes) -> bytes:
    """The same speech as 44.1 kHz stereo FLAC (resampled and downmixed by the server)."""
    import soundfile
    import soxr

    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    resampled = soxr.resample(samples, rate, 44100)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([resampled, 0.5 * resampled], axis=1), 44100, format="FLAC")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[tuple[int, int], bytes]:
    """(voice, sentence) -> WAV bytes."""
    folder = tmp_path_factory.mktemp("voices")
    return {
        (v, s): voice_clip(SENTENCES[s] + " " + SENTENCES[s + 1], VOICES[v], folder / f"{v}_{s}.wav")
        for v in range(len(VOICES))
        for s in (0, 2, 4)
    }


@pytest.fixture(scope="module")
def package_embedding():
    from resemblyzer import VoiceEncoder, preprocess_wav

    encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(data: bytes, suffix: str = ".wav") -> np.ndarray:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=suffix) as file:
            file.write(data)
            file.flush()
            return encoder.embed_utterance(preprocess_wav(file.name))

    return embed


@pytest.fixture(scope="module")
def speaker_server(speaker_repository):
    server = start_server(speaker_repository)
    yield server
    server.stop()


def served(server, files: list[bytes]) -> list[np.ndarray | InferenceError]:
    """One request per file, all at once (the stage batches them)."""

    def one(data: bytes):
        try:
            with TritonkitClient(server.grpc_url) as client:
                return client.infer("speaker_audio", {"AUDIO": pack_byte_rows([data])})["AUDIO_EMBEDS"][0]
        except InferenceError as exc:
            return exc

    with ThreadPoolExecutor(len(files)) as pool:
        return list(pool.map(one, files))


def test_preprocessing_is_resemblyzers_step_for_step(clips):
    from resemblyzer import VoiceEncoder, audio, preprocess_wav

    from tritonkit.preprocessing import voice
    from tritonkit.preprocessing.audio import AudioRecipe, decode_audio

    data = clips[1, 2]
    path = Path("/tmp") / "tritonkit-voice-check.wav"
    path.write_bytes(data)
    reference = preprocess_wav(path)
    ours = voice.preprocess(decode_audio(data, AudioRecipe()))
    assert len(ours) == len(reference) and np.abs(ours - reference).max() < 1e-6
    mel = voice.mel_spectrogram(reference, voice.mel_filters())
    expected = audio.wav_to_mel_spectrogram(reference)
    assert mel.shape == expected.shape and np.abs(mel - expected).max() <= 1e-5 * expected.max()
    encoder = VoiceEncoder(device="cpu", verbose=False)
    for samples in (1, 16000, 25600, 26000, 41000, 48000, len(reference)):
        _, slices = encoder.compute_partial_slices(samples, 1.3, 0.75)
        assert [(s.start, s.stop) for s in slices] == voice.partial_slices(samples, voice.VoiceRecipe()), samples


@pytest.mark.server
def test_served_embeddings_equal_the_packages_and_tell_voices_apart(speaker_server, clips, package_embedding):
    keys = sorted(clips)
    files = [clips[k] for k in keys] + [stereo_flac(clips[keys[0]])]
    answers = served(speaker_server, files)
    for key, answer in zip(keys, answers):
        assert not isinstance(answer, Exception), (key, answer)
        reference = package_embedding(clips[key])
        assert answer.shape == (256,) and abs(float(np.linalg.norm(answer)) - 1) < 1e-5
        assert float(answer @ reference) >= 0.9999, key
    flac = answers[-1]
    assert float(flac @ package_embedding(files[-1], ".flac")) >= 0.9999
    # the same voice's sentences are closer to each other than to any other voice's
    embeds = dict(zip(keys, answers))
    for v in range(len(VOICES)):
        same = min(float(embeds[v, a] @ embeds[v, b]) for a in (0, 2, 4) for b in (0, 2, 4) if a < b)
        other = max(
            float(embeds[v, a] @ embeds[w, b]) for a in (0, 2, 4) for b in (0, 2, 4) for w in range(3) if w != v
        )
        assert same > other, (v, same, other)


@pytest.mark.server
def test_bad_audio_fails_alone_with_its_own_message(speaker_server, clips, package_embedding):
    import soundfile

    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(32000, dtype=np.float32), 16000, format="WAV")
    hum = io.BytesIO()  # a quiet 50 Hz hum: sound, but no voice
    soundfile.write(
        hum, 0.01 * np.sin(np.arange(48000) * 2 * np.pi * 50 / 16000).astype(np.float32), 16000, format="WAV"
    )
    good = clips[0, 0]
    answers = served(speaker_server, [good, b"%PDF-1.4 not audio", silent.getvalue(), b"", good, hum.getvalue()])
    assert float(answers[0] @ package_embedding(good)) >= 0.9999
    assert float(answers[4] @ answers[0]) >= 0.99999
    assert "AUDIO: not a decodable audio file" in str(answers[1])
    assert "AUDIO: every sample is zero: there is no voice to embed" in str(answers[2])
    assert "AUDIO: " in str(answers[3])
    assert "AUDIO: no voice found (webrtcvad): nothing to embed" in str(answers[5]), answers[5]


@pytest.mark.server
def test_the_gateway_embeds_audio_data_urls_with_the_speaker_model(speaker_server, clips):
    """/v1/embeddings through the official SDK: audio inputs as data URLs (data:audio/...) or with
    `"modality": "audio"`; the vectors are the ensemble's; a text input is a 400 naming it."""
    import base64

    import openai

    from tests.test_openai_gateway import standalone_gateway

    wav = clips[2, 4]
    url = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    (want,) = served(speaker_server, [wav])
    with standalone_gateway(speaker_server.grpc_url) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["speaker"]
        answer = sdk.embeddings.create(model="speaker", input=[url, url])
        assert len(answer.data) == 2 and answer.usage.prompt_tokens == 0
        for item in answer.data:
            assert np.allclose(item.embedding, want, atol=1e-6)
        raw = sdk.embeddings.create(
            model="speaker",
            input=url.split(",", 1)[0].replace("audio/wav", "application/octet-stream") + "," + url.split(",", 1)[1],
            extra_body={"modality": "audio"},
        )
        assert np.allclose(raw.data[0].embedding, want, atol=1e-6)
        with pytest.raises(openai.BadRequestError, match=r"input\[0\]: speaker embeds no text"):
            sdk.embeddings.create(model="speaker", input="hello")


@pytest.mark.server
@pytest.mark.parametrize(
    "precision, engine",
    [
        ("int8", "onnxruntime"),
        pytest.param("fp16", "onnxruntime", marks=pytest.mark.heavy),
        pytest.param("int8", "openvino", marks=pytest.mark.heavy),
    ],
)
def test_reduced_precision_keeps_speaker_verification(precision, engine, tmp_path, clips, package_embedding):
    """A variant is judged by its cosine to FP32 and by the equal error rate on the built-in voices'
    held-out utterances (the report says both); the chosen one served still matches the package."""
    from tritonkit.build import build
    from tritonkit.families.base import BuildOptions
    from tritonkit.precision import PrecisionOptions

    out = tmp_path / "model_repository"
    result = build(
        "speaker", "resemblyzer", out, precision=PrecisionOptions(precision), options=BuildOptions(engine=engine)
    )
    report = result.accuracy[result.precision_variant]
    assert report.passed and report.task["eer_increase"] <= 0.02, report.summary()
    assert 0 <= report.task["eer_fp32"] < 0.2 and report.task["utterance_cosine_min"] > 0.99
    saved = json.loads((out / "speaker_embed" / "1" / "accuracy_report.json").read_text())
    assert saved["chosen"] == result.precision_variant and "eer" in saved["reports"][result.precision_variant]["task"]
    server = start_server(out)
    try:
        keys = sorted(clips)[:3]
        for key, answer in zip(keys, served(server, [clips[k] for k in keys])):
            assert not isinstance(answer, Exception), answer
            assert float(answer @ package_embedding(clips[key])) >= 0.99, key
    finally:
        server.stop()
