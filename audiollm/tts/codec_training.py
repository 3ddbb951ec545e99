"""What the codec stage (stages/codec.py) composes: its argument dataclasses, the codec model, clip datasets that
cut fixed-length segments, and the final save. Works in one plain process; DeepSpeed arrives through
TrainingArguments.deepspeed."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from audiollm.bad_rows import TALLY_KEY, BadRowLog
from audiollm.crash_safety import final_save, save_trainer_state
from audiollm.tts.codecs import CodecError, read_audio
from audiollm.tts.data import read_manifest
from audiollm.tts.melcodec import MelCodecConfig, MelCodecModel

log = logging.getLogger(__name__)


@dataclass
class CodecModelArguments:
    """A codec folder to go on training, or the sizes of a new one; None keeps MelCodecConfig's default."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A codec folder written by this stage "
                                           "(training goes on from it); default: a new codec of the sizes below."})
    sampling_rate: int | None = field(default=None, metadata={"help": "Hz; audio is resampled to it."})
    n_fft: int | None = field(default=None, metadata={"help": "Samples per STFT window."})
    n_mels: int | None = field(default=None, metadata={"help": "Mel bins the encoder reads."})
    hop_length: int | None = field(default=None, metadata={"help": "Samples between spectrogram frames."})
    stride: int | None = field(default=None, metadata={"help": "Spectrogram frames per codec frame."})
    hidden_size: int | None = field(default=None, metadata={"help": "Channels of the encoder and decoder."})
    encoder_layers: int | None = field(default=None, metadata={"help": "Residual conv blocks in the encoder."})
    decoder_layers: int | None = field(default=None, metadata={"help": "Residual conv blocks in the decoder."})
    num_quantizers: int | None = field(default=None, metadata={"help": "RVQ levels."})
    fsq_levels: list[int] | None = field(default=None, metadata={"help": "Values per FSQ dimension of a level; "
                                         "codes per level = their product (4 4 4 4: 256)."})
    quantizer_dropout: float | None = field(default=None, metadata={"help": "Share of rows trained on fewer levels."})
    griffin_lim_iters: int | None = field(default=None, metadata={"help": "Griffin-Lim iterations when decoding."})
    envelope_coefficients: int | None = field(default=None, metadata={"help": "Cepstral coefficients of the "
                                              "log-mel the encoder reads (its envelope, without pitch); 0: all."})

    def config(self) -> MelCodecConfig:
        sizes = {k: v for k, v in dataclasses.asdict(self).items() if k != "model_name_or_path" and v is not None}
        return MelCodecConfig(**sizes)


@dataclass
class CodecDataArguments:
    """Audio manifests and the training segments cut from them."""

    train_files: list[str] = field(metadata={"help": "JSONL manifests of {\"audio\": path} rows (other keys are "
                                             "ignored), audio paths relative to the manifest."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "Manifests for the evaluation loss "
                                         "(each clip's first segment)."})
    segment_seconds: float = field(default=1.0, metadata={"help": "Training segment length; rounded up to whole "
                                   "codec frames. Shorter clips are zero-padded, longer ones cropped at random."})
    max_audio_seconds: float = field(default=30.0, metadata={"help": "Longer files are skipped and counted."})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "Training stops when more clips than this "
                                    "share are unusable (corrupt, silent, missing...)."})


def load_codec_model(model_args: CodecModelArguments) -> MelCodecModel:
    if model_args.model_name_or_path:
        return MelCodecModel.from_pretrained(model_args.model_name_or_path)
    return MelCodecModel(model_args.config())


class ClipDataset(torch.utils.data.Dataset):
    """The clips of some manifests: item i is {"audio": absolute path, "where": "manifest:line"}."""

    def __init__(self, manifests: list[str]):
        self.rows = [row for m in manifests for row in read_manifest(m, keys=("audio",))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class SegmentCollator:
    """Clip rows -> {"input_values": (B, segment_samples)}: each clip loaded with the listening side's checks,
    then a random (training) or the first (evaluation) segment. Unusable clips are skipped and counted."""

    sample_rate: int
    segment_samples: int
    random_crop: bool
    bad_rows: BadRowLog
    max_seconds: float = 30.0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        segments = [s for s in (self.segment(row) for row in rows) if s is not None]
        if not segments:
            raise CodecError(f"every clip of a batch is unusable: {[r['where'] for r in rows]}")
        return {"input_values": torch.from_numpy(np.stack(segments)), TALLY_KEY: self.bad_rows.take_tally()}

    def segment(self, row: dict) -> np.ndarray | None:
        try:
            wav = read_audio(row["audio"], self.sample_rate, self.max_seconds)
        except CodecError as err:
            self.bad_rows.bad(row["where"], getattr(err.__cause__, "kind", "unreadable"), str(err))
            return None
        self.bad_rows.good()
        n = self.segment_samples
        if wav.size <= n:
            return np.pad(wav, (0, n - wav.size))
        start = int(torch.randint(0, wav.size - n + 1, ())) if self.random_crop else 0  # torch: seeded by Trainer
        return wav[start : start + n]


def segment_samples(config: MelCodecConfig, seconds: float) -> int:
    """Seconds -> samples, rounded up to whole codec frames (the encoder stacks ``stride`` spectrogram frames)."""
    frame = config.samples_per_frame
    return max(1, int(np.ceil(seconds * config.sampling_rate / frame))) * frame


def collators(config: MelCodecConfig, data_args: CodecDataArguments, output_dir: str) -> tuple:
    """(training collator with random crops, evaluation collator with first segments); one bad-clip log."""
    bad = BadRowLog(str(Path(output_dir) / "bad_rows.jsonl"), max_fraction=data_args.max_bad_fraction,
                    check=False)  # the trainer checks one ceiling for all ranks and workers
    n = segment_samples(config, data_args.segment_seconds)
    make = lambda crop: SegmentCollator(config.sampling_rate, n, crop, bad, data_args.max_audio_seconds)  # noqa: E731
    return make(True), make(False)


def save_codec(trainer) -> None:
    """Weights (safetensors) and config.json into output_dir: a folder ``load_codec`` reads. Written into
    ``.saving/final`` and moved in with config.json last (``audiollm.crash_safety.final_save``)."""
    with final_save(trainer, last=("config.json",)) as staging:
        save_trainer_state(trainer, staging)  # the loss curve
        trainer.save_model(staging)
    trainer.accelerator.end_training()
