"""Speaker embeddings: a GE2E voice encoder (resemblyzer's), audio in, who is speaking out.

One ensemble, NAME_audio (AUDIO -> AUDIO_EMBEDS), of one stage: resemblyzer's preprocessing (16 kHz,
volume, long silences cut with webrtcvad, 40-band mel, 1.6 s partial utterances:
`tritonkit.preprocessing.voice`) and the exported encoder over every partial of the batch, averaged
per file (`tritonkit.stages.speaker_embed`). The encoder: a 3-layer LSTM over the partial's mel
frames, its last hidden state through a linear layer and a ReLU, L2-normalised.

`--model` is a directory holding a `pretrained.pt` as resemblyzer saves it (`{"model_state": ...}`),
or `resemblyzer`: the package's own trained weights (Apache-2.0, `pip install --no-deps resemblyzer`).
The layer sizes are read from the weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonkit.contracts import AUDIO, AUDIO_EMBEDS, SPEAKER_EMBEDDINGS
from tritonkit.errors import ModelSourceError
from tritonkit.families.base import (
    SERVER_MEMORY_ROLE,
    BuildOptions,
    FamilySpec,
    OnnxExport,
    Pipeline,
    Stage,
    StageMemory,
    Tolerance,
    engine_parameters,
    register,
)
from tritonkit.preprocessing.voice import N_MELS, PARTIAL_FRAMES, VoiceRecipe
from tritonkit.samples import SENTENCES, VOICES
from tritonkit.triton_config import Batching, Tensor

WEIGHTS = "pretrained.pt"
PARTIAL_MELS = "PARTIAL_MELS"  # the encoder's input: partial utterances' mel frames [160, 40]


@dataclass
class LoadedSpeaker:
    model: Any  # VoiceEncoder

    @property
    def embedding_dim(self) -> int:
        return int(self.model.linear.out_features)


def voice_encoder(state: Mapping[str, Any]):
    """resemblyzer's VoiceEncoder network with the sizes of `state` (its `model_state`)."""
    import torch

    hidden, mels = state["lstm.weight_ih_l0"].shape
    layers = len([k for k in state if k.startswith("lstm.weight_ih_l")])

    class VoiceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(int(mels), int(hidden) // 4, layers, batch_first=True)
            self.linear = torch.nn.Linear(int(hidden) // 4, int(state["linear.weight"].shape[0]))
            self.relu = torch.nn.ReLU()

        def forward(self, mels):
            _, (hidden_state, _) = self.lstm(mels)
            raw = self.relu(self.linear(hidden_state[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    model = VoiceEncoder()
    model.load_state_dict(state, strict=False)  # resemblyzer's checkpoint also holds its training's similarity weights
    return model.eval()


def weights_path(source: str) -> Path:
    """The `pretrained.pt` that `--model` names: a file, a directory holding one, or `resemblyzer`."""
    if source == "resemblyzer":
        spec = importlib.util.find_spec("resemblyzer")
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                "--model resemblyzer: the package is not installed", hint="pip install --no-deps resemblyzer"
            )
        return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS
    path = Path(source).expanduser()
    path = path / WEIGHTS if path.is_dir() else path
    if not path.is_file():
        raise ModelSourceError(
            f"--model {source}: no {WEIGHTS} there",
            hint="give a directory holding resemblyzer's pretrained.pt, or `resemblyzer` for the package's own",
        )
    return path


@register
class SpeakerSpec(FamilySpec):
    name = "speaker"
    contract = SPEAKER_EMBEDDINGS
    description = "GE2E speaker encoder (resemblyzer) -> ensemble NAME_audio: audio in, speaker embedding out"
    model_class = "VoiceEncoder"
    loaded_class = LoadedSpeaker
    tolerances: ClassVar[Mapping[str, Tolerance]] = {"encoder": Tolerance(max_abs=1e-4, min_cosine=0.9999)}
    batching: ClassVar[Mapping[str, Batching]] = {
        # rows are files; their partials (1.3 per second of voice) run through the graph 64 at a time
        "embed": Batching(
            max_batch_size=16, preferred_batch_sizes=(4, 8, 16), max_queue_delay_us=2000, rows_per_run=64
        ),
    }
    max_request_bytes: ClassVar[int] = 200 * 1024 * 1024
    # The stub with the real encoder after 120 files of ~12 s at concurrency 16: 253 MB resident,
    # of which 17 MB are the weights (Python, numpy, scipy, webrtcvad, transformers' mel helper,
    # ONNX Runtime). Not yet soaked with `tritonkit plan --measure`; tritonserver's share is CLIP's.
    memory: ClassVar[Mapping[str, StageMemory]] = {
        "embed": StageMemory(fixed_mb=236),
        SERVER_MEMORY_ROLE: StageMemory(fixed_mb=45),
    }

    # INT8 and FP16 variants are judged by the encoder's cosine to FP32 PyTorch on held-out partial
    # utterances and by speaker verification: the equal error rate over every pair of held-out
    # utterances of the built-in voices (`task_check`) may rise by at most this much
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {
        "fp16": {"min_cosine": 0.999, "max_eer_increase": 0.01},
        "bf16": {"min_cosine": 0.995, "max_eer_increase": 0.02},
        "int8": {"min_cosine": 0.99, "max_eer_increase": 0.02},
    }

    def load(self, source: str, *, trust_remote_code: bool = False) -> LoadedSpeaker:
        import torch

        path = weights_path(source)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state = checkpoint["model_state"]
        except Exception as exc:
            raise ModelSourceError(f"--model {source}: {path} is not a resemblyzer checkpoint ({exc})") from None
        return LoadedSpeaker(model=voice_encoder(state))

    @staticmethod
    def make_tiny(directory: Path, seed: int = 0) -> Path:
        """Random weights of a small VoiceEncoder (2 layers of 32, embeddings of 32), saved as
        resemblyzer saves its own."""
        import torch

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        lstm, linear = torch.nn.LSTM(N_MELS, 32, 2, batch_first=True), torch.nn.Linear(32, 32)
        state = {f"lstm.{k}": v for k, v in lstm.state_dict().items()}
        state |= {f"linear.{k}": v for k, v in linear.state_dict().items()}
        torch.save({"model_state": state}, directory / WEIGHTS)
        return directory

    def tensors(self, loaded: LoadedSpeaker) -> dict[str, Tensor]:
        return {
            **SPEAKER_EMBEDDINGS.tensors(dims={AUDIO_EMBEDS: (loaded.embedding_dim,)}),
            PARTIAL_MELS: Tensor(PARTIAL_MELS, "float32", (PARTIAL_FRAMES, N_MELS)),
        }

    def exports(self, loaded: LoadedSpeaker) -> list[OnnxExport]:
        import torch

        t = self.tensors(loaded)
        generator = torch.Generator().manual_seed(0)
        # mel power spectra: non-negative, spread over several decades as speech's are
        samples = [
            {PARTIAL_MELS: torch.rand((batch, PARTIAL_FRAMES, N_MELS), generator=generator) ** 4 * 10}
            for batch in (2, 1, 5)
        ]
        partial_embeds = Tensor("PARTIAL_EMBEDS", "float32", (loaded.embedding_dim,))
        return [
            OnnxExport(
                role="encoder",
                module=loaded.model,
                inputs=(t[PARTIAL_MELS],),
                outputs=(partial_embeds,),
                sample_inputs=samples,
                tolerance=self.tolerance("encoder"),
            )
        ]

    def pipelines(
        self, loaded: LoadedSpeaker, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        from tritonkit.engines import graph_files, graph_name

        t = self.tensors(loaded)
        batching = self.stage_batching("embed")
        graph = onnx_files["encoder"]
        parameters = {"recipe": VoiceRecipe().to_json(), "rows_per_run": str(batching.rows_per_run)}
        parameters.update(engine_parameters(graph, "model", options))
        if options.gpu:
            parameters["providers"] = "CUDAExecutionProvider,CPUExecutionProvider"
        embed = Stage(
            "embed",
            "speaker_embed",
            (t[AUDIO],),
            (t[AUDIO_EMBEDS],),
            batching,
            parameters,
            graph_files(graph, "model"),
            kind="KIND_GPU" if options.gpu else "KIND_CPU",
            graphs={graph_name(graph, "model"): "encoder"},
        )
        return [Pipeline("audio", (t[AUDIO],), (t[AUDIO_EMBEDS],), (embed,), response_cache=True)]

    # -- reduced precision -----------------------------------------------------------------
    def precision_data(self, loaded: LoadedSpeaker, exports, onnx_files, calibration_dir):
        """Partial utterances to calibrate on and to judge by: of the audio files in
        `calibration_dir` (a quarter held out), or of the built-in voices (every espeak-ng voice of
        `tritonkit.samples.VOICES` saying each sample sentence: the first seven sentences calibrate,
        the last four are held out). The equal-error-rate check always uses the built-in voices'
        held-out utterances, whose speakers are known."""
        from tritonkit.precision import PrecisionData, data_files, split_files
        from tritonkit.preprocessing.voice import file_partials, mel_filters

        filters, recipe = mel_filters(), VoiceRecipe()

        def feeds(utterances: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
            joined = np.concatenate(utterances).astype(np.float32)
            return [{PARTIAL_MELS: joined[i : i + 16]} for i in range(0, len(joined), 16)]

        voices = builtin_voices()
        heldout_voices = [(who, mels) for who, sentence, mels in voices if sentence >= CALIBRATION_SENTENCES]
        if calibration_dir is not None:
            files = data_files(calibration_dir, AUDIO_SUFFIXES)
            calibration, heldout = split_files([file_partials(p.read_bytes(), filters, recipe) for p in files])
            source = f"{len(files)} audio files from {calibration_dir}"
        else:
            calibration = [mels for _, sentence, mels in voices if sentence < CALIBRATION_SENTENCES]
            heldout = [mels for _, mels in heldout_voices]
            source = f"{len(voices)} built-in clips: {len(VOICES)} espeak-ng voices x {len(SENTENCES)} sentences"
        return PrecisionData(
            calibration={"encoder": feeds(calibration)},
            heldout={"encoder": feeds(heldout)},
            source=source,
            task={"utterances": heldout_voices},
            builtin=calibration_dir is None,
        )

    def task_check(self, loaded: LoadedSpeaker, data, onnx_files):
        """Speaker verification with a variant's encoder against FP32's graph: the equal error rate
        over every pair of held-out utterances of the built-in voices, and each utterance
        embedding's cosine to FP32's."""
        from tritonkit.accuracy import cosines, equal_error_rate
        from tritonkit.engines import ONNX_RUNTIME
        from tritonkit.preprocessing.voice import average

        utterances = data.task["utterances"]
        speakers = [who for who, _ in utterances]

        def embed(path, runtime) -> np.ndarray:
            session = runtime.session(Path(path))
            name = session.get_inputs()[0].name
            return np.stack([average(session.run(None, {name: mels.astype(np.float32)})[0]) for _, mels in utterances])

        reference = embed(onnx_files["encoder"], ONNX_RUNTIME)
        reference_eer = equal_error_rate(reference, speakers)

        def check(files, runtime) -> dict[str, float]:
            found = embed(files["encoder"], runtime)
            eer = equal_error_rate(found, speakers)
            return {
                "eer_fp32": reference_eer,
                "eer": eer,
                "eer_increase": eer - reference_eer,
                "utterance_cosine_min": float(cosines(found, reference).min()),
            }

        return check


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
CALIBRATION_SENTENCES = 7  # of tritonkit.samples.SENTENCES; the rest are held out


def builtin_voices() -> list[tuple[int, int, np.ndarray]]:
    """(voice, sentence, partial utterances' mel frames) of every built-in voice saying every
    sample sentence (espeak-ng)."""
    import tempfile

    from tritonkit.preprocessing.voice import mel_filters, partials, preprocess
    from tritonkit.samples import voice_samples

    filters, recipe = mel_filters(), VoiceRecipe()
    found = []
    with tempfile.TemporaryDirectory() as folder:
        for who, voice in enumerate(VOICES):
            for k, sentence in enumerate(SENTENCES):
                samples = voice_samples(sentence, voice, Path(folder) / f"{who}_{k}.wav")
                found.append((who, k, partials(preprocess(samples), filters, recipe)))
    return found
