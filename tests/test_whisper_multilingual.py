"""A small random multilingual Whisper: language detection, forced language, translate and the
per-request options, through the served ensemble, token for token against transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tritonkit.client import TritonkitClient, whisper_inputs
from tritonkit.errors import InferenceError

pytestmark = pytest.mark.server

# (per-request options sent to the ensemble, the same options for transformers generate)
OPTION_ROWS = [
    pytest.param({}, {}, id="detected language"),
    pytest.param({"language": "fr"}, {"language": "fr"}, id="forced language"),
    pytest.param({"language": "German", "task": "translate"}, {"language": "de", "task": "translate"}, id="translate"),
    pytest.param({"task": "translate"}, {"task": "translate"}, id="detect then translate"),
    pytest.param({"max_new_tokens": 5}, {"max_new_tokens": 5}, id="max new tokens"),
    # With timestamps a window may be decoded in several passes (OpenAI's sequential algorithm). The
    # served default conditions each pass on the text before it (OpenAI's), transformers' does not;
    # and transformers raises a conditioned pass's token budget by its prompt's length, the server
    # gives every pass the same: both get the same conditioning and an explicit budget.
    pytest.param(
        {"timestamps": True, "max_new_tokens": 40},
        {"return_timestamps": True, "condition_on_prev_tokens": True, "max_new_tokens": 40},
        id="timestamps, detected language",
    ),
    pytest.param(
        {"language": "fr", "timestamps": True, "max_new_tokens": 40},
        {"language": "fr", "return_timestamps": True, "condition_on_prev_tokens": True, "max_new_tokens": 40},
        id="timestamps, forced language",
    ),
]


# Random weights give near-ties: a step whose best two logits are closer than this may flip
# between ONNX Runtime and PyTorch (float32 rounding, ~1e-5), so tokens are compared up to it.
NEAR_TIE = 1e-3


def reference(loaded, repository, data: bytes, options: dict) -> tuple[list[int], str, int]:
    """transformers generate's tokens (prompt and end token removed), the language it used, and
    how many leading tokens are decided by a margin larger than NEAR_TIE.

    It gets the features the served preprocessing computes (read back with tritonkit.offline):
    preprocessing parity is tested on its own; these tests are about decoding."""
    import torch

    from tritonkit.offline import preprocess

    model = loaded.model
    features = torch.from_numpy(preprocess(repository, "whisper", [data])["INPUT_FEATURES"])
    options = {"task": "transcribe", **options}  # transformers leaves the task token out unless asked
    with torch.no_grad():
        out = model.generate(features, **options, return_dict_in_generate=True, output_scores=True)
        language = options.get("language")
        if language is None:
            detected = int(model.detect_language(features)[0])
            language = next(k for k, v in model.generation_config.lang_to_id.items() if v == detected).strip("<|>")
    if "segments" in out:  # return_timestamps: OpenAI's sequential algorithm, one or more passes over the window
        return sequential_reference(model, out, language)
    sequences, scores = out.sequences, out.scores
    generated = sequences.reshape(1, -1)[0, -len(scores) :].tolist()  # sequences start with the prompt here
    tokens = [t for t in generated if t != model.generation_config.eos_token_id]
    decided = first_near_tie(scores, len(tokens))
    return tokens, language, decided


def first_near_tie(scores, count: int) -> int:
    """How many leading steps are decided by a margin larger than NEAR_TIE (at most `count`)."""
    import torch

    top2 = torch.stack(tuple(scores), 1).reshape(len(scores), -1).topk(2, dim=-1).values
    ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero()
    return min(int(ties[0]), count) if len(ties) else count


def sequential_reference(model, out, language: str) -> tuple[list[int], str, int]:
    """Timestamps: the tokens of every pass's segments (what the served decoder returns), and how
    many are decided: each pass's kept tokens are a prefix of what it generated, so its near-ties
    count only within them."""
    config = model.generation_config
    tokens = [t for t in out["sequences"][0].tolist() if t not in (config.eos_token_id, config.pad_token_id)]
    passes: list = []
    for segment in out["segments"][0]:
        if not any(segment["result"] is p for p, _ in passes):
            passes.append((segment["result"], 0))
        index = next(k for k, (p, _) in enumerate(passes) if p is segment["result"])
        passes[index] = (passes[index][0], passes[index][1] + len(segment["tokens"]))
    decided = 0
    for result, kept in passes:
        settled = first_near_tie(result["scores"], kept)
        decided += settled
        if settled < kept:
            break
    return tokens, language, decided


def served(result: dict) -> tuple[list[int], str]:
    return [int(t) for t in result["TOKENS"][0] if t >= 0], result["DECODED_LANGUAGE"][0, 0].decode()


def assert_same_decoding(result: dict, want: tuple[list[int], str, int]) -> None:
    tokens, language = served(result)
    want_tokens, want_language, decided = want
    assert language == want_language
    assert decided >= min(len(want_tokens), 16), "too many near-ties to compare; change the model seed"
    assert tokens[:decided] == want_tokens[:decided]
    if decided == len(want_tokens):
        assert tokens == want_tokens


@pytest.mark.parametrize("options, generate_options", OPTION_ROWS)
def test_served_tokens_and_language_equal_transformers(
    options, generate_options, multilingual_whisper_server, multilingual_whisper_loaded, speech_files
):
    _, loaded = multilingual_whisper_loaded
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        for data in speech_files[:3]:
            result = client.infer("whisper", whisper_inputs(data, **options))
            assert_same_decoding(
                result, reference(loaded, multilingual_whisper_server.repository, data, generate_options)
            )


def test_options_change_the_prompt(multilingual_whisper_server, speech_files):
    """Guards the test above against a model that ignores its prompt."""
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        outputs = {
            str(options): served(client.infer("whisper", whisper_inputs(speech_files[0], **options)))[0]
            for options in ({"language": "fr"}, {"language": "de"}, {"language": "de", "task": "translate"})
        }
    assert len(set(map(tuple, outputs.values()))) == 3, outputs


def test_requests_with_different_options_batch_together_with_their_single_results(
    multilingual_whisper_server, speech_files
):
    url = multilingual_whisper_server.grpc_url
    cases = [
        (data, options)
        for data in speech_files[:4]
        for options in ({}, {"language": "es"}, {"language": "ja", "task": "translate"}, {"max_new_tokens": 3})
    ]
    with TritonkitClient(url) as client:
        single = [served(client.infer("whisper", whisper_inputs(d, **o))) for d, o in cases]

    def call(case):
        data, options = case
        with TritonkitClient(url) as c:
            return served(c.infer("whisper", whisper_inputs(data, **options)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(call, cases)) == single


@pytest.mark.parametrize(
    "options, message",
    [
        ({"language": "xx"}, "LANGUAGE: unknown language 'xx'"),
        ({"task": "summarize"}, "TASK: 'summarize' is not one of transcribe, translate"),
        ({"max_new_tokens": 0}, "MAX_NEW_TOKENS: must be >= 1, got 0"),
    ],
)
def test_bad_options_fail_with_a_message_naming_the_option(options, message, multilingual_whisper_server, speech_files):
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client, pytest.raises(InferenceError, match=message):
        client.infer("whisper", whisper_inputs(speech_files[0], **options))


def test_client_transcribe_passes_options_and_reports_the_language(multilingual_whisper_server, speech_files):
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        transcripts = client.transcribe(speech_files[:2], language="it", task="translate", max_new_tokens=4)
    assert [t.language for t in transcripts] == ["it", "it"]
    assert all(len(t.tokens) == 4 for t in transcripts)


def test_beam_search_equals_transformers_on_the_multilingual_model(
    multilingual_whisper_server, multilingual_whisper_loaded, speech_files
):
    """Beam search (5 beams, French forced, with and without timestamps) on short files against
    transformers `generate(num_beams=5)`."""
    _, loaded = multilingual_whisper_loaded
    repository = multilingual_whisper_server.repository
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        for data in speech_files[:2]:
            for timestamps in (False, True):
                options = {"language": "fr", "beam_size": 5, "timestamps": timestamps}
                want, _, _ = reference(
                    loaded, repository, data, {"language": "fr", "num_beams": 5, "return_timestamps": timestamps}
                )
                assert served(client.infer("whisper", whisper_inputs(data, **options)))[0] == want, timestamps


def test_long_form_equals_transformers_on_the_multilingual_model(
    multilingual_whisper_server, multilingual_whisper_loaded, speech_files
):
    """OpenAI's long-form algorithm on the random multilingual model (detected language, task token,
    timestamps; >= 60 s of speech with pauses, and speech then 40 s of silence), both files in one
    request, with and without conditioning, against transformers' long-form `generate`.

    Both sides get MAX_NEW_TOKENS: this random model runs into the window's token budget (its
    generation config's max_length is 48), and transformers' loop raises that budget by the prompt's
    length for every window it decodes (it writes the raised max_length back into the config it
    reuses), where tritonkit gives each window the same budget."""
    from tests.test_whisper import long_clip, long_form_reference, wav_bytes
    from tritonkit.client import pack_byte_rows, transcript
    from tritonkit.preprocessing.audio import SAMPLE_RATE

    _, loaded = multilingual_whisper_loaded
    clips = [
        long_clip(speech_files, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 0, 1], 1.5),
        np.concatenate(
            [long_clip(speech_files, [2, 3, 4, 6], 1.0, tail_silence_s=40), long_clip(speech_files, [7], 0.5)]
        ),
    ]
    assert all(len(c) >= 60 * SAMPLE_RATE for c in clips)
    files = [wav_bytes(c.astype(np.float32), SAMPLE_RATE) for c in clips]
    budget = 40
    with TritonkitClient(multilingual_whisper_server.grpc_url) as client:
        for condition in (False, True):
            result = client.infer(
                "whisper",
                {
                    "AUDIO": pack_byte_rows(files),
                    "TIMESTAMPS": np.ones((2, 1), dtype=bool),
                    "CONDITION_ON_PREVIOUS": np.full((2, 1), condition, dtype=bool),
                    "MAX_NEW_TOKENS": np.full((2, 1), budget, dtype=np.int32),
                },
            )
            for row, data in enumerate(files):
                got = transcript(result, row)
                want = long_form_reference(loaded, data, condition, task="transcribe", max_new_tokens=budget)
                assert list(got.tokens) == want, (condition, row)
                assert len(got.segments) > 2 and got.segments[-1].end > 30  # more than one window
