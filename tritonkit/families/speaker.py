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
