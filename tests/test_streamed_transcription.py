"""Streamed transcription (NAME_stream, a decoupled decoder): a file's text is sent window by
window as it becomes final, and the pieces join into exactly the whole-answer transcript."""

from __future__ import annotations

import time

import pytest

from tritonkit.client import TritonkitClient
from tritonkit.errors import InferenceError


@pytest.mark.parametrize("options", [{"timestamps": True, "word_timestamps": True}, {}])
def test_pieces_arrive_window_by_window_and_join_into_the_whole_transcript(whisper_server, long_speech, options):
    with TritonkitClient(whisper_server.grpc_url) as client:
        (whole,) = client.transcribe([long_speech], **options)
        began = time.perf_counter()
        arrivals, pieces = [], []
        for piece in client.transcribe_stream(long_speech, **options):
            arrivals.append(time.perf_counter() - began)
            pieces.append(piece)
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.tokens] == list(whole.tokens)
    assert [s for p in pieces for s in p.segments] == list(whole.segments)
    assert [w for p in pieces for w in p.words] == list(whole.words)
    if options.get("timestamps"):  # long-form: the first window's text before the second window's
        assert len([p for p in pieces if p.text]) >= 2
        assert arrivals[0] < arrivals[-1]


def test_a_bad_file_fails_its_stream_with_one_clear_line(whisper_server, speech_files):
    with TritonkitClient(whisper_server.grpc_url) as client:
        with pytest.raises(InferenceError, match="AUDIO"):
            list(client.transcribe_stream(b"not audio at all"))
        (good,) = client.transcribe_stream(speech_files[0])  # the server goes on
    assert good.text.strip()
