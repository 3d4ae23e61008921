"""Whisper: audio bytes -> log-mel windows -> encoder -> batched greedy decoder with a KV cache -> text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonkit.contracts import (
    AUDIO,
    CHUNKING,
    DECODED_LANGUAGE,
    KNOWN_SPEAKER_NAMES,
    KNOWN_SPEAKER_REFERENCES,
    MAX_SPEAKERS,
    MIN_SPEAKERS,
    NUM_SPEAKERS,
    SEGMENT_SPEAKERS,
    SEGMENT_STATS,
    SEGMENT_TEXTS,
    SEGMENT_TIMES,
    TEXT,
    TOKENS,
    TRANSCRIPTION,
    TURN_SPEAKERS,
    TURN_TIMES,
    WORD_PROBS,
    WORD_SPEAKERS,
    WORD_TEXTS,
    WORD_TIMES,
)
from tritonkit.engines import graph_files, graph_name
from tritonkit.errors import ExportError
from tritonkit.families.base import (
    GRAPH_ROWS_PARAMETER,
    PLAN_DIMS_PARAMETER,
    SERVER_MEMORY_ROLE,
    Artefact,
    BuildOptions,
    FamilyOptions,
    FamilySpec,
    OnnxExport,
    Pipeline,
    Stage,
    StageMemory,
    Tolerance,
    dali_stage,
    encoder_stage,
    engine_parameters,
    flag,
    register,
    saved_pretrained,
)
from tritonkit.preprocessing.audio import SAMPLE_RATE, WINDOW_SECONDS
from tritonkit.triton_config import Batching, Tensor
from tritonkit.whisper_decoding import OFFSETS, WindowDecoder, layer_names
from tritonkit.word_timing import ALIGNMENT_SCORES, TOKEN_PROBS, alignment_heads

# Between composing models and inside the decoder's graphs.
INPUT_FEATURES = "INPUT_FEATURES"
WINDOW_SAMPLES = "WINDOW_SAMPLES"  # one 30 s window of 16 kHz samples, zero-padded (DALI log-mel input)
VAD_SAMPLES, SPEECH_PROBS = "VAD_SAMPLES", "SPEECH_PROBS"  # the preprocessing's call to the VAD model
WINDOW_FRAMES = "WINDOW_FRAMES"  # padding "features": how many of a window's frames hold audio (DALI log-mel)
FILE_FEATURES = "FILE_FEATURES"  # a long-form file's whole features (the decoder seeks through them)
WINDOW_ROW = "WINDOW_ROW"  # which row of the request each 30 s window came from
DECODE_OPTIONS = "DECODE_OPTIONS"  # each window's validated options (JSON of DecodeOptions)
ENCODER_HIDDEN = "ENCODER_HIDDEN"
CROSS_KEYS, CROSS_VALUES = "CROSS_KEYS", "CROSS_VALUES"
INPUT_IDS, PAST_KEYS, PAST_VALUES = "INPUT_IDS", "PAST_KEYS", "PAST_VALUES"
DECODER_ROWS_IN_FLIGHT = 16
LOGITS, PRESENT_KEYS, PRESENT_VALUES = "LOGITS", "PRESENT_KEYS", "PRESENT_VALUES"
# NAME_diarize's speaker stage: the speaker family's embedding stub (236 MB measured there) plus
# its Silero VAD session; not yet soaked with `tritonkit plan --measure`
SPEAKERS_MEMORY = StageMemory(fixed_mb=250)
# NAME_diarize's inputs beyond NAME's
DIARIZE_INPUTS = (NUM_SPEAKERS, MIN_SPEAKERS, MAX_SPEAKERS, KNOWN_SPEAKER_NAMES, KNOWN_SPEAKER_REFERENCES, CHUNKING)


@dataclass(frozen=True)
class WhisperBuildOptions(FamilyOptions):
    """Whisper's build options: the longest file, and how a short window is padded."""

    max_audio_seconds: float | None = flag("Longest accepted audio file (default 600).")
    audio_padding: str | None = flag(
        "audio (pad with silence to 30 s, then log-mel: OpenAI and transformers, the default) or "
        "features (zero frames after the log-mel, and timestamped files decoded sequentially: faster-whisper's "
        "transcripts; docs/BENCHMARKS.md compares their WER)."
    )
    diarize: str | None = flag(
        "Also write NAME_diarize (who spoke when: a speaker per segment and word) with this speaker encoder: "
        "resemblyzer (the package's trained weights) or a directory holding a resemblyzer pretrained.pt."
    )

    def __post_init__(self):
        from tritonkit.errors import InputError
        from tritonkit.preprocessing.audio import PADDINGS

        if self.audio_padding is not None and self.audio_padding not in PADDINGS:
            raise InputError(f"--audio-padding {self.audio_padding!r}: use one of {', '.join(PADDINGS)}")
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise InputError(f"--max-audio-seconds must be > 0, got {self.max_audio_seconds}")
        if self.diarize is not None:
            from tritonkit.families.speaker import weights_path

            weights_path(self.diarize)  # a wrong source fails here, before any slow work


@dataclass
class LoadedWhisper:
    model: Any
    processor: Any

    @property
    def config(self):
        return self.model.config

    @property
    def cache_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.decoder_layers, c.decoder_attention_heads, c.d_model // c.decoder_attention_heads


@register
class WhisperSpec(FamilySpec):
    name = "whisper"
    contract = TRANSCRIPTION
    options_class = WhisperBuildOptions
    model_types = ("whisper",)
    description = "Whisper speech recognition -> ensemble NAME (AUDIO bytes in, TEXT out)"
    model_class = "WhisperForConditionalGeneration"
    processor_classes: ClassVar[Mapping[str, str]] = {"processor": "WhisperProcessor"}
    loaded_class = LoadedWhisper
    tolerances: ClassVar[Mapping[str, Tolerance]] = {
        "encoder": Tolerance(max_abs=2e-3, min_cosine=0.9999),
        "decoder_cross_kv": Tolerance(max_abs=5e-3, min_cosine=0.9999),
        "decoder_step": Tolerance(max_abs=5e-3, min_cosine=0.9999),
        "decoder_alignment": Tolerance(max_abs=5e-3, min_cosine=0.9999),
    }
    max_request_bytes = 256 * 1024 * 1024  # one audio file may be 200 MiB (AudioRecipe.max_bytes)
    batching: ClassVar[Mapping[str, Batching]] = {
        "audio_preprocess": Batching(max_batch_size=32, preferred_batch_sizes=(8, 16), max_queue_delay_us=2000),
        "log_mel": Batching(max_batch_size=32, preferred_batch_sizes=(8, 16), max_queue_delay_us=1000, rows_per_run=1),
        "encoder": Batching(
            max_batch_size=32, preferred_batch_sizes=(4, 8, 16), max_queue_delay_us=2000, rows_per_run=1
        ),
        "decoder": Batching(max_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay_us=5000),
        "decoder_stream": Batching(max_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay_us=5000),
        "vad": Batching(max_batch_size=8, preferred_batch_sizes=(), max_queue_delay_us=0),
        # one file a request; every request's windows through the speaker encoder 64 at a time
        "speakers": Batching(max_batch_size=8, preferred_batch_sizes=(), max_queue_delay_us=1000, rows_per_run=64),
    }

    # Fixed resident memory per stage, measured with tiny.en under jemalloc (the default allocator)
    # with the in-flight decoder: `python scripts/calibrate_memory.py --family whisper` (three 90 s
    # soaks at concurrency 16 with the soak's 150 s files, `tritonkit plan --measure` after each,
    # every process charged its share of the pages the server's processes map, as a pod's limit
    # charges them; docs/RELIABILITY.md) and two 60 s CI soaks, each figure at the mean of the five.
    # The decoder's transformers tokenizer and ONNX Runtime sessions, whose arenas keep the largest
    # step they ran (1130-1364 MB after the 90 s soaks, 977 MB after the 60 s ones: the self-attention
    # cache is not preallocated yet), DALI's log-mel buffers and libraries, and tritonserver's
    # buffers for uploads of up to 600 s and the file features passed to the decoder.
    memory: ClassVar[Mapping[str, StageMemory]] = {
        # 58-89 MB measured across soaks (89 in a CI soak beside the test run's other servers): a small, noisy stub
        "audio_preprocess": StageMemory(fixed_mb=70, spread=0.25),
        # DALI's buffers: 138-150 MB after soaks here, 192 MB after a CI soak beside the test run's other servers
        "log_mel": StageMemory(fixed_mb=152, spread=0.3),
        "encoder": StageMemory(fixed_mb=113),
        "decoder": StageMemory(fixed_mb=726),
        # NAME_stream's decoder beside a whole-answer soak (it ran nothing): 650 MB resident = its
        # graphs' weights (381), one row's workspace (40), buffers (2) and this; streamed load grows
        # its ONNX Runtime arenas as the decoder's grow
        "decoder_stream": StageMemory(fixed_mb=227),
        "vad": StageMemory(fixed_mb=41),
        SERVER_MEMORY_ROLE: StageMemory(fixed_mb=296),
    }

    def memory_for(self, options: BuildOptions) -> Mapping[str, StageMemory]:
        found = super().memory_for(options)
        if self.family_options(options).diarize is None:
            return found
        return {**found, "speakers": SPEAKERS_MEMORY}

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        """A small random multilingual Whisper (Whisper's real 51865-id token layout)."""
        return make_tiny_whisper(directory)

    def tensors(self, loaded: LoadedWhisper) -> dict[str, Tensor]:
        c = loaded.config
        layers, heads, head_dim = loaded.cache_dims
        frames = 2 * c.max_source_positions
        cache = (heads, -1, head_dim)  # one tensor per layer; the cross keys come transposed
        frames_out = c.max_source_positions
        per_layer = {
            **{n: Tensor(n, "float32", (heads, head_dim, frames_out)) for n in layer_names(CROSS_KEYS, layers)},
            **{n: Tensor(n, "float32", (heads, frames_out, head_dim)) for n in layer_names(CROSS_VALUES, layers)},
            **{
                n: Tensor(n, "float32", cache)
                for prefix in (PAST_KEYS, PAST_VALUES, PRESENT_KEYS, PRESENT_VALUES)
                for n in layer_names(prefix, layers)
            },
        }
        return {
            **TRANSCRIPTION.tensors(),
            ALIGNMENT_SCORES: Tensor(
                ALIGNMENT_SCORES, "float32", (len(self.alignment_heads(loaded)), -1, c.max_source_positions)
            ),
            TOKEN_PROBS: Tensor(TOKEN_PROBS, "float32", (-1,)),
            FILE_FEATURES: Tensor(FILE_FEATURES, "float32", (c.num_mel_bins, -1), ragged=True),
            VAD_SAMPLES: Tensor(VAD_SAMPLES, "float32", (-1,), ragged=True),
            SPEECH_PROBS: Tensor(SPEECH_PROBS, "float32", (-1,)),
            DECODE_OPTIONS: Tensor(DECODE_OPTIONS, "string", (1,)),
            INPUT_FEATURES: Tensor(INPUT_FEATURES, "float32", (c.num_mel_bins, frames)),
            WINDOW_SAMPLES: Tensor(WINDOW_SAMPLES, "float32", (WINDOW_SECONDS * SAMPLE_RATE,)),
            WINDOW_ROW: Tensor(WINDOW_ROW, "int32", (1,)),
            WINDOW_FRAMES: Tensor(WINDOW_FRAMES, "int32", (1,)),
            ENCODER_HIDDEN: Tensor(ENCODER_HIDDEN, "float32", (c.max_source_positions, c.d_model)),
            **per_layer,
            INPUT_IDS: Tensor(INPUT_IDS, "int64", (-1,)),
            OFFSETS: Tensor(OFFSETS, "int64", (1,)),
            LOGITS: Tensor(LOGITS, "float32", (c.vocab_size,)),
        }

    @staticmethod
    def alignment_heads(loaded: LoadedWhisper) -> list[tuple[int, int]]:
        c = loaded.config
        return alignment_heads(loaded.model.generation_config, c.decoder_layers, c.decoder_attention_heads)

    def exports(self, loaded: LoadedWhisper) -> list[OnnxExport]:
        import torch

        from tritonkit.whisper_decoding import cross_kv_module, decoder_step_module
        from tritonkit.word_timing import alignment_module

        t = self.tensors(loaded)
        c = loaded.config
        g = torch.Generator().manual_seed(0)
        encoder = _encoder_module(loaded.model)
        features = [{INPUT_FEATURES: torch.randn((b, *t[INPUT_FEATURES].dims), generator=g) * 0.5} for b in (2, 1)]
        cross = cross_kv_module(loaded.model)
        step = decoder_step_module(loaded.model)
        layers, heads, head_dim = loaded.cache_dims
        cross_names = [*layer_names(CROSS_KEYS, layers), *layer_names(CROSS_VALUES, layers)]
        past_names = [*layer_names(PAST_KEYS, layers), *layer_names(PAST_VALUES, layers)]
        present_names = [*layer_names(PRESENT_KEYS, layers), *layer_names(PRESENT_VALUES, layers)]
        step_samples = []
        with torch.no_grad():
            # (windows, beams a window, prompt tokens, cached tokens): rows are windows x beams
            # and the rows' left padding (the in-flight loop's rows began at different steps)
            shapes = (
                (2, 1, 2, 0, (0, 0)),
                (3, 1, 1, 3, (0, 2, 1)),
                (1, 1, 1, 5, (0,)),
                (2, 3, 1, 4, (0,) * 3 + (3,) * 3),
            )
            for windows, beams, prompt, past, offsets in shapes:
                hidden = torch.randn((windows, c.max_source_positions, c.d_model), generator=g)
                rows = windows * beams
                step_samples.append(
                    {
                        INPUT_IDS: torch.randint(0, c.vocab_size, (rows, prompt), generator=g),
                        OFFSETS: torch.tensor(offsets, dtype=torch.int64).view(rows, 1),
                        **{n: torch.randn((rows, heads, past, head_dim), generator=g) for n in past_names},
                        **dict(zip(cross_names, cross(hidden))),
                        "_hidden": hidden,
                    }
                )
        step_inputs = [INPUT_IDS, OFFSETS, *past_names, *cross_names]
        check_decoder_step(loaded.model, step, step_samples[0], step_inputs, self.tolerance("decoder_step"))
        for sample in step_samples:
            sample.pop("_hidden")
        hidden_samples = [
            {ENCODER_HIDDEN: torch.randn((b, c.max_source_positions, c.d_model), generator=g)} for b in (2, 1)
        ]
        end_token = int(loaded.model.generation_config.eos_token_id)
        alignment = alignment_module(loaded.model, self.alignment_heads(loaded), end_token)
        alignment_samples = [
            {
                ENCODER_HIDDEN: torch.randn((windows, c.max_source_positions, c.d_model), generator=g),
                INPUT_IDS: torch.randint(0, c.vocab_size, (windows, length), generator=g),
            }
            for windows, length in ((2, 7), (1, 12))
        ]
        return [
            OnnxExport(
                "encoder", encoder, (t[INPUT_FEATURES],), (t[ENCODER_HIDDEN],), features, self.tolerance("encoder")
            ),
            OnnxExport(
                "decoder_cross_kv",
                cross,
                (t[ENCODER_HIDDEN],),
                tuple(t[n] for n in cross_names),
                hidden_samples,
                self.tolerance("decoder_cross_kv"),
            ),
            OnnxExport(
                "decoder_step",
                step,
                tuple(t[n] for n in step_inputs),
                (t[LOGITS], *(t[n] for n in present_names)),
                step_samples,
                self.tolerance("decoder_step"),
                first_axis=dict.fromkeys(cross_names, "windows"),  # rows are windows x beams
            ),
            OnnxExport(
                "decoder_alignment",
                alignment,
                (t[ENCODER_HIDDEN], t[INPUT_IDS]),
                (t[ALIGNMENT_SCORES], t[TOKEN_PROBS]),
                alignment_samples,
                self.tolerance("decoder_alignment"),
            ),
        ]

    # -- reduced precision -----------------------------------------------------------------
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {
        "fp16": {"min_cosine": 0.99, "max_wer_increase": 0.02},
        "bf16": {"min_cosine": 0.99, "max_wer_increase": 0.02},
        "int8": {"min_cosine": 0.9, "max_wer_increase": 0.02},
    }
    # NNCF's full INT8 of the step graph: min cosine 0.28 to FP32, WER +0.19 on tiny.en (gate failed)
    int8_weights_only: ClassVar[frozenset[str]] = frozenset({"decoder_step"})
    # Zen 3 (no VNNI), static INT8 on the built-in varied audio: WER +0.119 with 7-bit weights
    # (failed), within 0.02 with full-range weights (passed)
    int8_reduce_range: ClassVar[bool] = False
    # word timing searches the alignment heads' attention for its peaks: kept exact, run once per window
    full_precision_roles: ClassVar[frozenset[str]] = frozenset({"decoder_alignment"})

    def precision_data(self, loaded: LoadedWhisper, exports, onnx_files, calibration_dir):
        """Audio files (wav, flac, ogg, mp3; a same-named .txt holds the transcript, used for WER)
        from `calibration_dir`, or the built-in varied audio (`tritonkit.calibration.varied_speech`:
        the sample sentences in three espeak-ng voices, some with noise, silence, noise). Every
        second file is held out.

        The decoder graphs only run inside the decoding loop, so their calibration inputs are
        recorded while the FP32 graphs decode the calibration audio."""
        from tritonkit.errors import InputError
        from tritonkit.precision import PrecisionData, data_files, split_files
        from tritonkit.preprocessing.audio import AudioRecipe, decode_audio
        from tritonkit.samples import SENTENCES, espeak_available

        if calibration_dir is not None:
            paths = data_files(calibration_dir, (".wav", ".flac", ".ogg", ".mp3"))
            if not paths:
                raise InputError(f"--calibration-data {calibration_dir}: no audio files (wav, flac, ogg, mp3)")
            clips = [p.read_bytes() for p in paths]
            texts = [
                p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None for p in paths
            ]
            source = f"{len(clips)} audio files from {calibration_dir}"
        elif espeak_available():
            import tempfile

            from tritonkit.calibration import BUILTIN_NOTE, VOICES, varied_speech

            with tempfile.TemporaryDirectory() as folder:
                varied = varied_speech(SENTENCES, folder)
            clips = [data for _, data, _ in varied]
            texts = [text for _, _, text in varied]
            source = (
                f"{len(SENTENCES)} sentences spoken by espeak-ng in {len(VOICES)} voices (every fourth with noise at "
                f"10 dB SNR), silence and noise: {BUILTIN_NOTE}"
            )
        else:
            raise InputError(
                "reduced-precision Whisper needs audio to calibrate and judge on",
                hint="pass --calibration-data DIR with audio files (and .txt transcripts), or install espeak-ng",
            )
        recipe = AudioRecipe(n_mels=loaded.config.num_mel_bins)
        samples = [decode_audio(clip, recipe) for clip in clips]
        indices = list(range(len(clips)))
        calibration_ids, heldout_ids = split_files(indices, heldout_share=0.5)  # WER needs words to count
        mel_filters = np.asarray(loaded.processor.feature_extractor.mel_filters, dtype=np.float32)
        recorded = {
            role: self._recorded_feeds(loaded, onnx_files, [samples[i] for i in ids], mel_filters)
            for role, ids in (("calibration", calibration_ids), ("heldout", heldout_ids))
        }
        return PrecisionData(
            calibration=recorded["calibration"],
            heldout={role: feeds[:8] for role, feeds in recorded["heldout"].items()},
            source=source,
            builtin=calibration_dir is None,
            task={
                "samples": [samples[i] for i in heldout_ids],
                "texts": [texts[i] for i in heldout_ids],
                "mel_filters": mel_filters,
            },
        )

    def _recorded_feeds(self, loaded, onnx_files, samples, mel_filters) -> dict[str, list]:
        import onnxruntime as ort

        from tritonkit.precision import RecordingSession
        from tritonkit.preprocessing.audio import AudioRecipe, log_mel, split_windows
        from tritonkit.whisper_decoding import DecodeOptions

        recipe = AudioRecipe(n_mels=loaded.config.num_mel_bins)
        windows = [w for s in samples for w in split_windows(s, recipe)]
        features = [log_mel(windows[i : i + 2], mel_filters) for i in range(0, len(windows), 2)]
        encoder = ort.InferenceSession(str(onnx_files["encoder"]), providers=["CPUExecutionProvider"])
        hidden = [encoder.run(None, {INPUT_FEATURES: f})[0] for f in features]
        cross = RecordingSession(
            ort.InferenceSession(str(onnx_files["decoder_cross_kv"]), providers=["CPUExecutionProvider"])
        )
        step = RecordingSession(
            ort.InferenceSession(str(onnx_files["decoder_step"]), providers=["CPUExecutionProvider"]),
            keep_every=3,
            limit=48,
        )
        decoder = WindowDecoder(cross, step, self.decode_settings(loaded))
        for h in hidden:
            decoder.decode(h, [DecodeOptions()] * len(h))
        return {
            "encoder": [{INPUT_FEATURES: f} for f in features],
            "decoder_cross_kv": cross.feeds,
            "decoder_step": step.feeds,
        }

    def task_check(self, loaded: LoadedWhisper, data, onnx_files):
        """WER and token agreement of a variant's whole pipeline against FP32's on held-out audio."""
        from tritonkit.accuracy import wer

        reference_tokens, reference_texts = self._transcribe(loaded, onnx_files, data.task)
        truths = data.task["texts"]

        def check(files, runtime) -> dict[str, float]:
            tokens, texts = self._transcribe(loaded, files, data.task, runtime)
            metrics = {
                "token_agreement": sum(a == b for a, b in zip(tokens, reference_tokens)) / len(tokens),
                "wer_vs_fp32": wer(reference_texts, texts),
            }
            if all(t is not None for t in truths):
                metrics["wer_fp32"] = wer(truths, reference_texts)
                metrics["wer"] = wer(truths, texts)
                metrics["wer_increase"] = metrics["wer"] - metrics["wer_fp32"]
            else:
                metrics["wer_increase"] = metrics["wer_vs_fp32"]
            return metrics

        return check

    def _transcribe(self, loaded, files, task, runtime=None) -> tuple[list[list[int]], list[str]]:
        from tritonkit.engines import ONNX_RUNTIME
        from tritonkit.preprocessing.audio import AudioRecipe, log_mel, split_windows
        from tritonkit.whisper_decoding import DecodeOptions

        def session(role):
            return (runtime or ONNX_RUNTIME).session(files[role])

        encoder = session("encoder")
        decoder = WindowDecoder(session("decoder_cross_kv"), session("decoder_step"), self.decode_settings(loaded))
        recipe = AudioRecipe(n_mels=loaded.config.num_mel_bins)
        all_tokens, texts = [], []
        for samples in task["samples"]:
            features = log_mel(split_windows(samples, recipe), task["mel_filters"])
            hidden = encoder.run(None, {INPUT_FEATURES: features})[0]
            tokens = [t for window in decoder.decode(hidden, [DecodeOptions()] * len(hidden))[0] for t in window]
            all_tokens.append(tokens)
            texts.append(loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return all_tokens, texts

    def vad_stages(self, t: Mapping[str, Tensor]) -> tuple[Stage, ...]:
        """Silero VAD (from the installed faster-whisper wheel), or nothing when it is not installed
        (VAD_FILTER then fails with how to get it)."""
        model = _silero_vad_file()
        if model is None:
            return ()
        return (
            Stage(
                role="vad",
                template="silero_vad",
                inputs=(t[VAD_SAMPLES],),
                outputs=(t[SPEECH_PROBS],),
                batching=self.stage_batching("vad"),
                files={"silero_vad.onnx": model},
            ),
        )

    def decode_settings(self, loaded: LoadedWhisper):
        from tritonkit.whisper_decoding import DecodeSettings

        settings = DecodeSettings.from_generation_config(
            loaded.model.generation_config, loaded.config.max_target_positions
        )
        return replace(settings, cross_kv_per_window=True)  # DecoderStep's cross attention

    def pipelines(
        self, loaded: LoadedWhisper, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        from tritonkit.preprocessing.audio import WINDOW_SAMPLES as WINDOW_SAMPLES_COUNT
        from tritonkit.preprocessing.audio import AudioRecipe
        from tritonkit.preprocessing.dali import log_mel_graph

        t = self.tensors(loaded)

        def save_mel_filters(folder: Path) -> Mapping[str, Path]:
            folder.mkdir(parents=True, exist_ok=True)
            np.save(
                folder / "mel_filters.npy", np.asarray(loaded.processor.feature_extractor.mel_filters, dtype=np.float32)
            )
            return {"mel_filters.npy": folder / "mel_filters.npy"}

        recipe = AudioRecipe(n_mels=loaded.config.num_mel_bins)
        own = self.family_options(options)
        recipe = recipe.with_options(max_seconds=own.max_audio_seconds, padding=own.audio_padding)
        counted = options.preprocessing == "dali" and recipe.padding == "features"  # the log-mel needs WINDOW_FRAMES
        settings = self.decode_settings(loaded).to_json()
        from tritonkit.whisper_decoding import OPTION_INPUTS

        request_options = tuple(t[name] for name in OPTION_INPUTS)  # the order the preprocessing's config lists
        outputs = (
            t[TEXT],
            t[TOKENS],
            t[DECODED_LANGUAGE],
            t[SEGMENT_TIMES],
            t[SEGMENT_TEXTS],
            t[SEGMENT_STATS],
            t[WORD_TIMES],
            t[WORD_TEXTS],
            t[WORD_PROBS],
        )
        # DALI computes log-mel in its own stage (GPU operators on a GPU); the python engine
        # computes it with numpy in the decoding stage.
        windows = t[WINDOW_SAMPLES] if options.preprocessing == "dali" else t[INPUT_FEATURES]
        stages = [
            Stage(
                role="audio_preprocess",
                template="audio_preprocess",
                inputs=(t[AUDIO], *request_options),
                outputs=(windows, t[WINDOW_ROW], t[DECODE_OPTIONS], t[FILE_FEATURES])
                + ((t[WINDOW_FRAMES],) if counted else ()),
                batching=self.stage_batching("audio_preprocess"),
                parameters={"recipe": recipe.to_json(), "decode_settings": settings},
                artefacts=(Artefact("save the mel filter bank", save_mel_filters),),
                callees=self.vad_stages(t),
            )
        ]
        if options.preprocessing == "dali":
            stages.append(
                dali_stage(
                    "log_mel",
                    log_mel_graph(
                        loaded.config.num_mel_bins, WINDOW_SAMPLES, recipe.padding, WINDOW_FRAMES if counted else None
                    ),
                    (t[WINDOW_SAMPLES],) + ((t[WINDOW_FRAMES],) if counted else ()),
                    (t[INPUT_FEATURES],),
                    self.stage_batching("log_mel"),
                    options,
                    warmup={WINDOW_SAMPLES: (WINDOW_SAMPLES_COUNT,), **({WINDOW_FRAMES: (1,)} if counted else {})},
                )
            )
        longest = loaded.config.max_target_positions
        decoder_parameters = {
            "decode_settings": settings,
            "tokenizer_dir": "tokenizer",
            # the step graph's sequence dims at their largest, for `tritonkit plan`'s memory estimate
            PLAN_DIMS_PARAMETER: json.dumps(
                {
                    "INPUT_IDS_dim1": 1,
                    "windows": "batch",  # greedy decoding: every row a window of its own
                    **{
                        f"{name}_dim2": longest - 1
                        for prefix in (PAST_KEYS, PAST_VALUES)
                        for name in layer_names(prefix, loaded.config.decoder_layers)
                    },
                }
            ),
        }
        # windows in flight (a beam-search window counts once): on tiny.en, 2 cores, 16 windows decoded
        # 6.2-8.8 windows/s and 32 windows 6.3-7.5 in three runs (scripts/bench_inflight_whisper.py
        # --rows-sweep): 32 gains nothing measurable and holds twice the cross K/V (18 MB a window)
        decoder_parameters["max_rows_in_flight"] = str(DECODER_ROWS_IN_FLIGHT)
        if options.gpu:
            decoder_parameters["providers"] = "CUDAExecutionProvider,CPUExecutionProvider"
        else:  # the decoder runs its cross-KV graph in slices (WindowDecoder.CROSS_KV_ROWS_PER_RUN)
            decoder_parameters[GRAPH_ROWS_PARAMETER] = json.dumps(
                {graph_name(onnx_files["decoder_cross_kv"], "cross_kv"): WindowDecoder.CROSS_KV_ROWS_PER_RUN}
            )
        decoder_parameters.update(engine_parameters(onnx_files["decoder_cross_kv"], "cross_kv", options))
        decoder_parameters.update(engine_parameters(onnx_files["decoder_step"], "step", options))
        decoder_parameters.update(engine_parameters(onnx_files["decoder_alignment"], "align", options))
        encoder = encoder_stage(
            "encoder",
            (t[INPUT_FEATURES],),
            (t[ENCODER_HIDDEN],),
            self.stage_batching("encoder"),
            onnx_files["encoder"],
            options,
        )
        # long-form windows are encoded by the decoder itself (BLS), in batches the encoder takes
        decoder_parameters["encoder_max_batch_size"] = str(encoder.batching.max_batch_size)

        def decoder(role: str, stream: bool) -> Stage:
            return Stage(
                role=role,
                template="whisper_decoder",
                callees=(encoder,),
                inputs=(t[ENCODER_HIDDEN], t[WINDOW_ROW], t[DECODE_OPTIONS], t[FILE_FEATURES]),
                outputs=outputs,
                batching=self.stage_batching(role),
                parameters=decoder_parameters,
                files={
                    **graph_files(onnx_files["decoder_cross_kv"], "cross_kv"),
                    **graph_files(onnx_files["decoder_step"], "step"),
                    **graph_files(onnx_files["decoder_alignment"], "align"),
                },
                graphs={
                    graph_name(onnx_files["decoder_cross_kv"], "cross_kv"): "decoder_cross_kv",
                    graph_name(onnx_files["decoder_step"], "step"): "decoder_step",
                    graph_name(onnx_files["decoder_alignment"], "align"): "decoder_alignment",
                },
                artefacts=(tokenizer,),
                kind="KIND_GPU" if options.gpu else "KIND_CPU",
                config_extra={"model_transaction_policy": {"decoupled": True}} if stream else {},
            )

        tokenizer = saved_pretrained("tokenizer", "tokenizer", loaded.processor.tokenizer.save_pretrained)
        front = (*stages, encoder)
        inputs = (t[AUDIO], *request_options)
        whole = decoder("decoder", False)
        # NAME answers once; NAME_stream sends each window's text as soon as it is final
        pipelines = [
            Pipeline(role="", inputs=inputs, outputs=outputs, stages=(*front, whole)),
            Pipeline(role="stream", inputs=inputs, outputs=outputs, stages=(*front, decoder("decoder_stream", True))),
        ]
        if own.diarize is not None:  # NAME_diarize: NAME's stages, then who spoke when
            speakers = self.diarize_stage(t, own.diarize, recipe.max_seconds, options)
            pipelines.append(
                Pipeline(
                    role="diarize",
                    inputs=inputs + tuple(t[name] for name in DIARIZE_INPUTS),
                    outputs=outputs + speakers.outputs,
                    stages=(*front, whole, speakers),
                )
            )
        return pipelines

    def diarize_stage(self, t: Mapping[str, Tensor], source: str, max_seconds: float, options: BuildOptions) -> Stage:
        """NAME_diarize's speaker stage (tritonkit.stages.speaker_turns): the speaker family's
        encoder, exported and checked against PyTorch as `tritonkit build speaker` does it, and
        faster-whisper's Silero VAD."""
        from tritonkit.preprocessing.voice import VoiceRecipe

        vad_file = _silero_vad_file()
        if vad_file is None:
            raise ExportError(
                "--diarize finds speech with faster-whisper's Silero VAD: pip install faster-whisper, then rebuild"
            )

        def export_speaker_encoder(folder: Path) -> Mapping[str, Path]:
            from tritonkit.export import export_onnx, validate_onnx
            from tritonkit.families.speaker import SpeakerSpec

            spec = SpeakerSpec()
            (export,) = spec.exports(spec.load(source))
            path = export_onnx(export, folder / "speaker.onnx")
            report = validate_onnx(export, path)
            if not report.passed:
                raise ExportError(f"{report.summary()}: the speaker encoder's ONNX export does not match PyTorch")
            return {"speaker.onnx": path}

        batching = self.stage_batching("speakers")
        parameters = {
            "recipe": VoiceRecipe(max_seconds=max_seconds).to_json(),
            "rows_per_run": str(batching.rows_per_run),
        }
        return Stage(
            role="speakers",
            template="speaker_turns",
            inputs=(t[AUDIO], t[SEGMENT_TIMES], t[WORD_TIMES], *(t[name] for name in DIARIZE_INPUTS)),
            outputs=(t[SEGMENT_SPEAKERS], t[WORD_SPEAKERS], t[TURN_TIMES], t[TURN_SPEAKERS]),
            batching=batching,
            parameters=parameters,
            files={"silero_vad.onnx": vad_file},
            artefacts=(Artefact(f"export the speaker encoder ({source}) for diarization", export_speaker_encoder),),
            kind="KIND_CPU",  # LSTM windows of a few files: the CPU's work even in a GPU repository
        )


def _silero_vad_file() -> Path | None:
    from tritonkit.errors import TritonkitError
    from tritonkit.vad import bundled_model

    try:
        return bundled_model()
    except TritonkitError:
        return None


def _encoder_module(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.model.encoder

        def forward(self, input_features):
            return self.encoder(input_features=input_features).last_hidden_state

    return Encoder().eval()


def check_decoder_step(model, step, sample: dict, inputs: list[str], tolerance: Tolerance) -> float:
    """The re-implemented decoder step must give transformers' logits (first step, no cache)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        ours = step(*(sample[name] for name in inputs))[0]
        theirs = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=sample["_hidden"]),
            decoder_input_ids=sample[INPUT_IDS],
            use_cache=False,
        ).logits[:, -1]
    error = float((ours - theirs).abs().max())
    if error > tolerance.max_abs:
        raise ExportError(f"decoder_step: differs from transformers by {error:.3g} (limit {tolerance.max_abs:g})")
    return error


# -- the tiny model (tests, the demo): random weights, a real architecture and tokenizer --------
WHISPER_SPECIALS = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def multilingual_whisper_tokenizer_json() -> dict:
    """Whisper's multilingual token layout (51865 ids) on the English BPE of the bundled tiny.en.

    Multilingual Whisper has one more ordinary token than English Whisper, so every special token
    sits one id higher (<|endoftext|> 50257, <|startoftranscript|> 50258, languages from 50259).
    The extra ordinary token at 50256 is a placeholder no merge produces; random weights make the
    exact BPE irrelevant, the id layout is what decoding depends on.
    """
    import copy
    import json

    from tritonkit.convert_ct2 import bundled_tiny_en

    english = json.loads((bundled_tiny_en() / "tokenizer.json").read_text())
    data = copy.deepcopy(english)
    vocab = data["model"]["vocab"]
    end_of_text = vocab.pop("<|endoftext|>")
    vocab["<|tritonkit-placeholder|>"] = end_of_text
    shift = {t["id"]: t["id"] + 1 for t in data["added_tokens"]}
    for token in data["added_tokens"]:
        token["id"] = shift[token["id"]]
    for special in data["post_processor"]["special_tokens"].values():
        special["ids"] = [shift.get(i, i) for i in special["ids"]]
    return data


def make_tiny_whisper(
    directory: Path,
    *,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 48,
    init_std: float = 0.5,
    seed: int = 0,
) -> Path:
    """A random multilingual WhisperForConditionalGeneration with Whisper's real token layout.

    Decoding stops after `max_length` tokens (the generation config's max_length): random weights
    seldom choose the end token, so this keeps tests quick. With the usual init (std 0.02) every
    input decodes to the same tokens; `init_std` 0.5 makes tokens and detected languages depend
    on the audio, which is what the tests need to tell inputs and options apart.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from tritonkit.convert_ct2 import save_whisper_processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = multilingual_whisper_tokenizer_json()
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    languages = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in ids}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    # Whisper suppresses a fixed list of punctuation-like ordinary tokens plus the special ones.
    suppress = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93]
    suppress += [ids[s] for s in WHISPER_SPECIALS[:-1]]
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
        suppress_tokens=suppress,
        begin_suppress_tokens=[220, end],
        init_std=init_std,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=max_length,
        suppress_tokens=suppress,
        begin_suppress_tokens=[220, end],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_initial_timestamp_index=50,
        is_multilingual=True,
        lang_to_id=languages,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        return_timestamps=False,
    )
    model.save_pretrained(str(directory))
    save_whisper_processor(directory, tokenizer_json, config)
    return directory
