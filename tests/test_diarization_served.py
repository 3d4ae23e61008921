"""Who spoke when, served: Whisper tiny.en built with `--diarize resemblyzer` (NAME_diarize), a real
tritonserver over gRPC and the gateway through the official SDK.

The conversation is assembled from espeak-ng voices with known turns (`tritonkit.samples.conversation`);
the reference is the same method in process with resemblyzer's own PyTorch encoder
(`tritonkit.diarization.diarize`), both scored with pyannote.metrics."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import serve_with_gateway
from tritonkit import contracts as c
from tritonkit import diarization, samples
from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows, transcript
from tritonkit.errors import InferenceError
from tritonkit.families.base import BuildOptions
from tritonkit.families.whisper import WhisperBuildOptions
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio

KEY = "sk-diarize-test"
SEED = 1  # two voices, ten turns, 50 s


def wav(samples_16k: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples_16k, 16000, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """(WAV bytes, true turns) of a two-speaker conversation, and a clip of each voice saying
    something else (a known speaker's reference)."""
    if not samples.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("talk")
    audio, truth = samples.conversation(SEED, 2, folder)
    voices = sorted({who for _, _, who in truth})
    references = {
        who: wav(
            samples.voice_samples(
                samples.SENTENCES[9] + " " + samples.SENTENCES[10], samples.VOICES[who], folder / f"ref{who}.wav"
            )
        )
        for who in voices
    }
    return wav(audio), truth, references


@pytest.fixture(scope="module")
def served(whisper_dir, tmp_path_factory):
    """tiny.en with NAME_diarize, behind the gateway: (base URL, gRPC address, repository)."""
    out = tmp_path_factory.mktemp("diarize_repo") / "model_repository"
    build("whisper", str(whisper_dir), out, options=BuildOptions(family=WhisperBuildOptions(diarize="resemblyzer")))
    with serve_with_gateway(out, KEY) as (base, grpc):
        yield base, grpc, out


def diarized(grpc: str, data: bytes, **options) -> dict[str, np.ndarray]:
    inputs = {
        c.AUDIO: pack_byte_rows([data]),
        c.TIMESTAMPS: c.request_row(c.TIMESTAMPS, True),
        c.WORD_TIMESTAMPS: c.request_row(c.WORD_TIMESTAMPS, True),
    }
    inputs |= {name: c.request_row(name, value) for name, value in options.items()}
    with TritonkitClient(grpc) as client:
        return client.infer("whisper_diarize", inputs)


def annotation(turns):
    from pyannote.core import Annotation, Segment

    found = Annotation()
    for start, end, who in turns:
        found[Segment(start, end)] = str(who)
    return found


def error_rates(truth, turns) -> tuple[float, float]:
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = annotation(truth), annotation(turns)
    return (
        abs(DiarizationErrorRate()(reference, hypothesis)),
        abs(DiarizationErrorRate(collar=0.25)(reference, hypothesis)),
    )


def in_process(data: bytes, **kwargs) -> diarization.Diarization:
    """The reference: the same method with resemblyzer's own encoder (PyTorch)."""
    import torch
    from resemblyzer import VoiceEncoder

    from tritonkit import vad
    from tritonkit.preprocessing import voice

    encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(mels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(mels)).numpy()

    session = vad.session(vad.bundled_model())
    return diarization.diarize(decode_audio(data, AudioRecipe()), embed, session, voice.mel_filters(), **kwargs)


def served_turns(outputs) -> list[tuple[float, float, str]]:
    return transcript(outputs).turns


def test_served_error_rate_is_the_in_process_reference(served, talk):
    """DER of the served pipeline within 0.02 of the in-process reference on the same file, both
    finding the two speakers; every segment and word labelled with one of them."""
    _, grpc, _ = served
    data, truth, _ = talk
    outputs = diarized(grpc, data)
    turns = served_turns(outputs)
    reference = in_process(data)
    reference_turns = [(t.start, t.end, reference.names[t.speaker]) for t in reference.found]
    served_der, served_collar = error_rates(truth, turns)
    reference_der, reference_collar = error_rates(truth, reference_turns)
    print(
        f"DER served {served_der:.3f} (collar {served_collar:.3f}), in process {reference_der:.3f} ({reference_collar:.3f})"
    )
    assert served_der <= reference_der + 0.02
    assert served_collar <= reference_collar + 0.02
    assert served_der < 0.3  # two clear voices: most of the time attributed right
    result = transcript(outputs)
    speakers = {name for _, _, name in turns}
    assert len(speakers) == 2 == len({name for _, _, name in reference_turns})
    assert result.segments and {s.speaker for s in result.segments} <= speakers
    assert result.words and {w.speaker for w in result.words} <= speakers
    # a segment's speaker is the true speaker of most of it, under the best mapping of labels
    true_speaker = {name: max(truth, key=lambda t: overlap(t, turns, name))[2] for name in speakers}
    right = [true_at((s.start + s.end) / 2, truth) == true_speaker[s.speaker] for s in result.segments]
    assert sum(right) >= 0.8 * len(right), right


def overlap(true_turn, turns, name) -> float:
    a, b, _ = true_turn
    return sum(max(0.0, min(b, end) - max(a, start)) for start, end, who in turns if who == name)


def true_at(t: float, truth) -> int:
    """Who truly speaks at `t`: the speech span holding it, else the nearest (a pause inside a turn)."""
    return min(truth, key=lambda span: max(span[0] - t, t - span[1], 0.0))[2]


def test_known_speakers_are_named(served, talk, tmp_path):
    """Reference clips with names label the matching speakers; a clip of nobody in the file
    names no one."""
    _, grpc, _ = served
    data, truth, references = talk
    voices = sorted(references)
    names = ("ann", "bob")
    outputs = diarized(
        grpc,
        data,
        **{
            c.KNOWN_SPEAKER_NAMES: list(names),
            c.KNOWN_SPEAKER_REFERENCES: [references[v] for v in voices],
        },
    )
    result = transcript(outputs)
    assert {name for _, _, name in result.turns} == set(names)
    named = dict(zip(voices, names))
    right = [named.get(true_at((s.start + s.end) / 2, truth)) == s.speaker for s in result.segments]
    assert sum(right) >= 0.8 * len(right), right
    # a voice that is not in the conversation (cosine 0.61-0.78 to its two voices): its name goes to no one
    assert 4 not in voices
    stranger = samples.VOICES[4]
    clip = wav(samples.voice_samples(samples.SENTENCES[3] + " " + samples.SENTENCES[4], stranger, tmp_path / "x.wav"))
    outputs = diarized(grpc, data, **{c.KNOWN_SPEAKER_NAMES: ["carol"], c.KNOWN_SPEAKER_REFERENCES: [clip]})
    assert "carol" not in {name for _, _, name in transcript(outputs).turns}


def test_speaker_count_given(served, talk):
    _, grpc, _ = served
    data, _, _ = talk
    for count in (1, 3):
        turns = served_turns(diarized(grpc, data, **{c.NUM_SPEAKERS: count}))
        assert len({name for _, _, name in turns}) == count
    turns = served_turns(diarized(grpc, data, **{c.MIN_SPEAKERS: 3, c.MAX_SPEAKERS: 4}))
    assert 3 <= len({name for _, _, name in turns}) <= 4


def test_bad_requests_fail_alone(served, talk):
    """Each bad request gets one line naming its input; a good one sent with them is answered."""
    _, grpc, _ = served
    data, _, references = talk
    data = wav(decode_audio(data, AudioRecipe())[: 8 * 16000])  # 8 s: each request is transcribed first
    clip = next(iter(references.values()))
    bad = {
        "KNOWN_SPEAKER_REFERENCES[0]": {c.KNOWN_SPEAKER_NAMES: ["ann"], c.KNOWN_SPEAKER_REFERENCES: [b"not audio"]},
        "1 names for 2": {c.KNOWN_SPEAKER_NAMES: ["ann"], c.KNOWN_SPEAKER_REFERENCES: [clip, clip]},
        "no voice": {c.KNOWN_SPEAKER_NAMES: ["ann"], c.KNOWN_SPEAKER_REFERENCES: [wav(np.zeros(48000, np.float32))]},
        "NUM_SPEAKERS": {c.NUM_SPEAKERS: 0},
        "MAX_SPEAKERS": {c.MIN_SPEAKERS: 3, c.MAX_SPEAKERS: 2},
        "CHUNKING": {c.CHUNKING: '{"type": "semantic_vad"}'},
        "each known speaker once": {c.KNOWN_SPEAKER_NAMES: ["ann", "ann"], c.KNOWN_SPEAKER_REFERENCES: [clip, clip]},
    }

    def send(options):
        try:
            return diarized(grpc, data, **options)
        except InferenceError as exc:
            return exc

    with ThreadPoolExecutor(len(bad) + 1) as pool:
        good = pool.submit(send, {})
        answers = {expected: pool.submit(send, options) for expected, options in bad.items()}
        for expected, answer in answers.items():
            error = answer.result()
            assert isinstance(error, InferenceError), expected
            assert expected in str(error) and "\n" not in str(error).strip(), str(error)
        assert transcript(good.result()).turns


def test_diarized_json_through_the_sdk(served, talk):
    """OpenAI's diarized_json with known speakers (data URLs) and both chunking strategies."""
    import openai

    base, _, _ = served
    data, _, references = talk
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
    voices = sorted(references)
    urls = [f"data:audio/wav;base64,{base64.b64encode(references[v]).decode()}" for v in voices]
    for strategy in ("auto", {"type": "server_vad", "silence_duration_ms": 150, "prefix_padding_ms": 30}):
        result = client.audio.transcriptions.create(
            model="whisper",
            file=("talk.wav", data),
            response_format="diarized_json",
            known_speaker_names=["ann", "bob"],
            known_speaker_references=urls,
            chunking_strategy=strategy,
        )
        assert result.task == "transcribe" and result.duration == pytest.approx(
            len(decode_audio(data, AudioRecipe())) / 16000, abs=0.01
        )
        assert result.segments and {s.speaker for s in result.segments} == {"ann", "bob"}
        assert all(s.type == "transcript.text.segment" and s.end > s.start and s.text for s in result.segments)
        assert result.usage.type == "duration"
    plain = client.audio.transcriptions.create(
        model="whisper", file=("talk.wav", data), response_format="diarized_json"
    )
    assert {s.speaker for s in plain.segments} == {"A", "B"}
    with pytest.raises(openai.BadRequestError, match="known_speaker_names"):
        client.audio.transcriptions.create(
            model="whisper",
            file=("talk.wav", data),
            response_format="diarized_json",
            known_speaker_names=["ann", "bob"],
            known_speaker_references=urls[:1],
        )
    with pytest.raises(openai.BadRequestError, match="needs response_format diarized_json"):
        client.audio.transcriptions.create(
            model="whisper", file=("talk.wav", data), known_speaker_names=["ann"], known_speaker_references=urls[:1]
        )
    with pytest.raises(openai.BadRequestError, match="response_format"):  # OpenAI's translation schema has none
        client.audio.translations.create(model="whisper", file=("talk.wav", data), response_format="diarized_json")


def test_cli_rttm_and_subtitles(served, talk, tmp_path):
    """`tritonkit transcribe --diarize`: RTTM read by pyannote, SubRip and WebVTT cues with speakers."""
    import srt
    import webvtt
    from pyannote.database.util import load_rttm

    _, grpc, _ = served
    data, truth, references = talk
    audio = tmp_path / "talk.wav"
    audio.write_bytes(data)
    ann = tmp_path / "ann.wav"
    voices = sorted(references)
    ann.write_bytes(references[voices[0]])

    def transcribe(*args: str) -> str:
        command = [sys.executable, "-m", "tritonkit.cli", "transcribe", str(audio), "--url", grpc, "--diarize", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    transcribe("--format", "rttm", "--output-dir", str(tmp_path), "--known-speaker", f"ann={ann}")
    loaded = load_rttm(str(tmp_path / "talk.rttm"))["talk"]
    assert "ann" in loaded.labels() and len(loaded.labels()) == 2
    assert error_rates(truth, [(s.start, s.end, who) for s, _, who in loaded.itertracks(yield_label=True)])[0] < 0.3
    cues = list(srt.parse(transcribe("--format", "srt", "--num-speakers", "2")))
    assert cues and all(cue.content.split(": ", 1)[0] in ("A", "B") for cue in cues)
    captions = webvtt.from_buffer(io.StringIO(transcribe("--format", "vtt")))
    assert captions and {caption.voice for caption in captions} == {"A", "B"}
    lines = transcribe().strip().splitlines()
    assert lines and all(line.split(": ", 1)[0] in ("A", "B") for line in lines)
    refused = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "transcribe", str(audio), "--url", grpc, "--format", "rttm"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "need --diarize" in refused.stderr and "Traceback" not in refused.stderr
