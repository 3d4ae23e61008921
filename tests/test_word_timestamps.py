"""Word-level timestamps: the alignment graph against transformers' cross-attention, served word
times against faster-whisper's alignment of the same tokens (openai-whisper's algorithm, in
CTranslate2), batched and alone, with beam search and VAD, for short and long-form files."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tritonkit.client import TritonkitClient
from tritonkit.word_timing import alignment_module, dtw, median_filter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("which", ["whisper_loaded", "multilingual_whisper_loaded"])
def test_alignment_graph_equals_transformers_cross_attention(which, request):
    import torch

    spec, loaded = request.getfixturevalue(which)
    model = loaded.model
    heads = spec.alignment_heads(loaded)
    end = int(model.generation_config.eos_token_id)
    alignment = alignment_module(model, heads, end)
    g = torch.Generator().manual_seed(3)
    features = torch.randn((2, loaded.config.num_mel_bins, 3000), generator=g) * 0.5
    ids = torch.randint(0, end, (2, 9), generator=g)
    with torch.no_grad():
        hidden = model.model.encoder(features).last_hidden_state
        scores, probs = alignment(hidden, ids)
        eager = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        try:
            out = model(encoder_outputs=(hidden,), decoder_input_ids=ids, output_attentions=True)
        finally:
            model.config._attn_implementation = eager
    theirs = torch.stack([out.cross_attentions[layer][:, head] for layer, head in heads], dim=1)
    assert torch.allclose(torch.softmax(scores, -1), theirs, atol=1e-5)
    expected = torch.softmax(out.logits[..., :end], -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(probs[:, :-1], expected, atol=1e-5)


def test_dtw_and_median_filter_are_openai_whispers():
    """The vectorised DTW against the cell-by-cell recurrence of openai-whisper's dtw_cpu."""

    def reference(x):
        n, m = x.shape
        cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
        trace = -np.ones((n + 1, m + 1), dtype=np.float32)
        cost[0, 0] = 0
        for j in range(1, m + 1):
            for i in range(1, n + 1):
                c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
                if c0 < c1 and c0 < c2:
                    c, t = c0, 0
                elif c1 < c0 and c1 < c2:
                    c, t = c1, 1
                else:
                    c, t = c2, 2
                cost[i, j] = x[i - 1, j - 1] + c
                trace[i, j] = t
        i, j = n, m
        trace[0, :], trace[:, 0] = 2, 1
        path = []
        while i > 0 or j > 0:
            path.append((i - 1, j - 1))
            i, j = (i - 1, j - 1) if trace[i, j] == 0 else (i - 1, j) if trace[i, j] == 1 else (i, j - 1)
        return np.array(path[::-1]).T

    rng = np.random.default_rng(0)
    for n, m in ((1, 5), (7, 40), (12, 12), (20, 3)):
        x = rng.normal(size=(n, m)).astype(np.float32)
        text, time = dtw(x)
        want = reference(x)
        assert (text == want[0]).all() and (time == want[1]).all()
    x = rng.normal(size=(2, 3, 30)).astype(np.float32)
    filtered = median_filter(x, 7)
    padded = np.pad(x, [(0, 0), (0, 0), (3, 3)], mode="reflect")
    assert np.allclose(filtered[1, 2, 10], np.median(padded[1, 2, 10:17]))


def _faster_whisper_words(model, audio: np.ndarray, tokens: list[int], duration: float):
    """faster-whisper's add_word_timestamps for one window's text tokens (no timestamps)."""
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import pad_or_trim

    features = model.feature_extractor(audio)
    frames = min(3000, features.shape[-1] - 1)
    encoder_output = model.encode(pad_or_trim(features[:, :3000]))
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    segments = [[{"seek": 0, "start": 0.0, "end": duration, "tokens": tokens}]]
    model.add_word_timestamps(segments, tokenizer, encoder_output, frames, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、", 0.0)
    return [(w["word"], w["start"], w["end"], w["probability"]) for w in segments[0][0]["words"]]


@pytest.fixture(scope="module")
def faster_whisper_model():
    faster_whisper = pytest.importorskip("faster_whisper")
    from tritonkit.convert_ct2 import bundled_tiny_en

    return faster_whisper.WhisperModel(str(bundled_tiny_en()), device="cpu", compute_type="float32")


def _audio(data: bytes) -> np.ndarray:
    """The 16 kHz samples the server decodes (espeak-ng speaks at 22.05 kHz)."""
    from tritonkit.preprocessing.audio import AudioRecipe, decode_audio

    return decode_audio(data, AudioRecipe())


def test_served_words_equal_faster_whispers_alignment_batched_and_alone(
    whisper_server, speech_files, faster_whisper_model
):
    clips = speech_files[:6]
    with TritonkitClient(whisper_server.grpc_url) as client:
        alone = [client.transcribe([clip], word_timestamps=True)[0] for clip in clips[:2]]
        batched = client.transcribe(clips, word_timestamps=True, concurrency=6)
        plain = client.transcribe(clips, concurrency=6)
    assert [t.text for t in batched] == [t.text for t in plain]  # words change no text
    assert [t.words for t in alone] == [t.words for t in batched[:2]]
    differences, probabilities = [], []
    for clip, served in zip(clips, batched):
        audio = _audio(clip)
        text_tokens = [t for t in served.tokens if t < 50256]
        want = _faster_whisper_words(faster_whisper_model, audio, text_tokens, len(audio) / 16000)
        assert [w.word for w in served.words] == [w for w, *_ in want]
        for word, (_, start, end, probability) in zip(served.words, want):
            differences += [abs(word.start - start), abs(word.end - end)]
            probabilities.append(abs(word.probability - probability))
    # the served log-mel is DALI's and faster-whisper computes its own: the encoder outputs differ a
    # little, so a path may take a neighbouring 20 ms frame (measured: median 0, max 0.1 s at a
    # segment's last word), and a word's probability moves (mean difference 0.04-0.05)
    assert np.median(differences) <= 0.02 and max(differences) <= 0.2, sorted(differences)[-5:]
    assert np.mean(probabilities) < 0.1


def test_words_with_beam_search_vad_and_long_form_files(whisper_server, speech_files):
    silence = np.zeros(16000 * 3, dtype=np.float32)
    import soundfile

    pieces = []
    for clip in speech_files[:8]:
        pieces += [_audio(clip), silence]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.concatenate(pieces), 16000, format="WAV")
    long_file = buffer.getvalue()
    duration = sum(len(p) for p in pieces) / 16000
    assert duration > 30
    with TritonkitClient(whisper_server.grpc_url) as client, ThreadPoolExecutor(3) as pool:
        jobs = [
            pool.submit(client.transcribe, [long_file], word_timestamps=True, timestamps=True),
            pool.submit(client.transcribe, [speech_files[2]], word_timestamps=True, beam_size=5, timestamps=True),
            pool.submit(client.transcribe, [long_file], word_timestamps=True, vad=True),
        ]
        (long_words,), (beamed,), (vad_words,) = (job.result(timeout=300) for job in jobs)
        (plain_long,) = client.transcribe([long_file], timestamps=True)
    assert long_words.text == plain_long.text
    for transcript in (long_words, beamed, vad_words):
        words = transcript.words
        assert "".join(w.word for w in words).split() == transcript.text.split()
        starts = [w.start for w in words]
        assert starts == sorted(starts) and all(0 <= w.start <= w.end <= duration + 0.01 for w in words)
    # every segment's words lie within a second of it (a word of a later window is on the file's timeline)
    for segment in long_words.segments:
        inside = [w for w in long_words.words if segment.start - 1 <= w.start <= segment.end + 1]
        assert inside, segment
    # VAD drops the silences but words keep the file's timeline: they reach past 30 s
    assert vad_words.words[-1].end > 30


def test_a_bad_file_fails_alone_beside_requests_with_words(whisper_server, speech_files):
    from tritonkit.errors import InferenceError

    with TritonkitClient(whisper_server.grpc_url) as client, ThreadPoolExecutor(3) as pool:
        good = [pool.submit(client.transcribe, [clip], word_timestamps=True) for clip in speech_files[:2]]
        bad = pool.submit(client.transcribe, [b"RIFF not really a wav"], word_timestamps=True)
        with pytest.raises(InferenceError, match="AUDIO"):
            bad.result(timeout=120)
        for job in good:
            (transcript,) = job.result(timeout=120)
            assert transcript.words and "".join(w.word for w in transcript.words).split() == transcript.text.split()


def test_words_on_the_multilingual_model_alone_and_batched(multilingual_whisper_server, speech_files):
    """A random multilingual model (its prompt carries the detected language and the task): words
    come alike alone and batched, in order and inside the audio."""
    clips = speech_files[:4]
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        alone = [client.transcribe([clip], word_timestamps=True, max_new_tokens=24)[0] for clip in clips[:2]]
        batched = client.transcribe(clips, word_timestamps=True, max_new_tokens=24, concurrency=4)
    assert [t.words for t in alone] == [t.words for t in batched[:2]]
    for clip, transcript in zip(clips, batched):
        duration = len(_audio(clip)) / 16000
        assert bool(transcript.words) == bool(transcript.text.strip())
        starts = [w.start for w in transcript.words]
        assert starts == sorted(starts) and all(0 <= w.start <= w.end <= duration + 0.01 for w in transcript.words)
