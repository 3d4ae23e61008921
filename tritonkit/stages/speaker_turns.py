"""Who spoke when in a transcribed file: NAME_diarize's last stage (tritonkit.diarization).

Inputs: AUDIO (the file, as the ensemble received it), the decoder's SEGMENT_TIMES and WORD_TIMES,
and the request's optional NUM_SPEAKERS, MIN_SPEAKERS, MAX_SPEAKERS, KNOWN_SPEAKER_NAMES with
KNOWN_SPEAKER_REFERENCES (one encoded clip of each known speaker), CHUNKING (OpenAI's
chunking_strategy). Outputs: SEGMENT_SPEAKERS and WORD_SPEAKERS (a name per segment and word; ""
for padding rows), TURN_TIMES and TURN_SPEAKERS (the turns, for RTTM).

Each request's speech is found with Silero VAD (`silero_vad.onnx`, in this stub), cut into windows
and turned into mel frames here; the windows and the known speakers' partial utterances of every
request in the batch run through the speaker encoder (`speaker.onnx`) together; each request is
then clustered and labelled on its own. A bad clip or option fails its own request only.
Parameters: `recipe` (JSON of VoiceRecipe: the references' preprocessing and limits),
`rows_per_run` (encoder rows per graph run), `engine` and threads as the other graph stages.
"""

import itertools

import numpy as np

from tritonkit import diarization, vad
from tritonkit.batched_model import BatchedModel, object_rows, run_in_slices, string_rows
from tritonkit.errors import InputError
from tritonkit.preprocessing.audio import decode_audio
from tritonkit.preprocessing.voice import VoiceRecipe, average, file_partials, mel_filters

AUDIO, SEGMENT_TIMES, WORD_TIMES = "AUDIO", "SEGMENT_TIMES", "WORD_TIMES"
NAMES, REFERENCES = "KNOWN_SPEAKER_NAMES", "KNOWN_SPEAKER_REFERENCES"
MAX_NAME_CHARS = 64


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.session = self.open_session(self.version_dir / self.parameters.get("model_file", "speaker.onnx"))
        self.graph_input = self.session.get_inputs()[0].name
        self.graph_output = self.session.get_outputs()[0].name
        self.vad_session = vad.session(self.version_dir / "silero_vad.onnx")
        self.recipe = VoiceRecipe.from_json(self.parameters["recipe"])
        self.filters = mel_filters()
        self.rows_per_run = int(self.parameters.get("rows_per_run", "0"))

    def prepare(self, inputs):
        audio = inputs[AUDIO]
        if audio.ndim != 2 or audio.shape[0] != 1:
            raise InputError(f"AUDIO: one file per request to the diarized ensemble (shape {list(audio.shape)})")
        samples = decode_audio(audio.tobytes(), self.recipe.audio)
        options = diarization.DiarizeOptions(
            num_speakers=self.count(inputs, "NUM_SPEAKERS"),
            min_speakers=self.count(inputs, "MIN_SPEAKERS") or 1,
            max_speakers=self.count(inputs, "MAX_SPEAKERS"),
            vad=diarization.chunking_vad(
                string_rows(inputs["CHUNKING"], "CHUNKING")[0] if "CHUNKING" in inputs else None
            ),
        )
        names, references = self.known_speakers(inputs)
        speech = diarization.speech_regions(samples, self.vad_session, options.vad)
        spans = diarization.windows(speech)
        mels = diarization.window_mels(samples, spans, self.filters)
        job = {
            "options": options,
            "speech": speech,
            "spans": spans,
            "names": names,
            "references": [len(r) for r in references],
            "segments": inputs[SEGMENT_TIMES].reshape(-1, 2),
            "words": inputs[WORD_TIMES].reshape(-1, 2) if WORD_TIMES in inputs else np.zeros((0, 2), np.float32),
        }
        return {"mels": object_rows([np.concatenate([mels, *references])]), "job": object_rows([job])}

    @staticmethod
    def count(inputs, name: str) -> int | None:
        if name not in inputs:
            return None
        values = inputs[name].reshape(-1)
        if len(values) != 1:
            raise InputError(f"{name}: give one number, got {len(values)}")
        return int(values[0])

    def known_speakers(self, inputs) -> tuple[list[str], list[np.ndarray]]:
        """The known speakers' names and their clips' partial utterances (each clip preprocessed
        as a speaker embedding's file is)."""
        names = [n for n in string_rows(inputs[NAMES].reshape(-1, 1), NAMES)] if NAMES in inputs else []
        clips = [bytes(c) for c in inputs[REFERENCES].reshape(-1)] if REFERENCES in inputs else []
        if len(names) != len(clips):
            raise InputError(
                f"{NAMES}: {len(names)} names for {len(clips)} {REFERENCES}; give one name per reference clip"
            )
        if len(names) > diarization.MAX_KNOWN_SPEAKERS:
            raise InputError(f"{NAMES}: {len(names)} known speakers; at most {diarization.MAX_KNOWN_SPEAKERS}")
        for name in names:
            if not name.strip() or len(name) > MAX_NAME_CHARS:
                raise InputError(f"{NAMES}: {name[:80]!r}; give a name of 1 to {MAX_NAME_CHARS} characters")
        if len(set(names)) != len(names):
            raise InputError(f"{NAMES}: {names}; give each known speaker once")
        found = []
        for k, clip in enumerate(clips):
            try:
                found.append(file_partials(clip, self.filters, self.recipe))
            except InputError as exc:
                message = str(exc).split(": ", 1)[-1]
                raise InputError(
                    f"{REFERENCES}[{k}] ({names[k]}): {message}; give a clip of 2 to 10 s of that speaker's voice",
                    reason=exc.reason,
                ) from None
        return names, found

    def run(self, batch):
        mels = list(batch["mels"])
        counts = [len(m) for m in mels]
        if not sum(counts):
            return {"embeds": object_rows([np.zeros((0, 1), np.float32) for _ in mels])}
        feed = {self.graph_input: np.concatenate(mels).astype(np.float32)}
        (embedded,) = run_in_slices(lambda part: self.session.run([self.graph_output], part), feed, self.rows_per_run)
        bounds = np.cumsum([0, *counts])
        return {"embeds": object_rows([embedded[a:b] for a, b in itertools.pairwise(bounds)])}

    def finish(self, outputs, rows):
        job, embeds = rows["job"][0], outputs["embeds"][0]
        windows = len(job["spans"])
        bounds = np.cumsum([windows, *job["references"]])
        references = np.stack([average(embeds[a:b]) for a, b in itertools.pairwise(bounds)]) if job["names"] else None
        found = diarization.labelled(
            embeds[:windows], job["spans"], job["speech"], job["options"], references, job["names"]
        )

        def labels(times: np.ndarray) -> np.ndarray:
            named = [found.speaker(float(a), float(b)).encode() if a >= 0 else b"" for a, b in times] or [b""]
            return np.array([named], dtype=object)

        # as the decoder pads its segments and words: at least one row, times -1 and "" where none
        turn_times = [(t.start, t.end) for t in found.found] or [(-1.0, -1.0)]
        turn_names = [found.names[t.speaker].encode() for t in found.found] or [b""]
        return {
            "SEGMENT_SPEAKERS": labels(job["segments"]),
            "WORD_SPEAKERS": labels(job["words"]),
            "TURN_TIMES": np.array([turn_times], dtype=np.float32),
            "TURN_SPEAKERS": np.array([turn_names], dtype=object),
        }
