"""Bad input: ``audiollm data check`` names every problem class with its file and row, training skips and counts
the same rows (and stops on a mostly broken manifest), and a fuzzed collator gives a valid batch or a clear error.

The fixture folder holds one file of every bad audio class, plus rows with every row-level problem, beside good
rows; ``EXPECTED`` is the kinds each row must be reported with.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from audiollm.audio import SAMPLE_RATE
from audiollm.bad_rows import TooManyBadRows, read_bad_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SECONDS = 40.0  # the check's and the recipe's max_audio_seconds
MAX_LENGTH = 1500  # tokens: the 31 s clip (775 audio tokens) fits, the long text does not
GOOD_ROWS = 12


def tone(seconds: float, hz: float = 220.0, amplitude: float = 0.3, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def wav_header(rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono PCM WAV header claiming ``data_bytes`` of samples at ``rate`` Hz."""
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", data_bytes)


def write_bad_audio(folder: Path) -> dict[str, str]:
    """One file per audio problem class (and the usable-but-noted ones); {kind: file name}."""
    sf.write(folder / "silent.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    sf.write(folder / "blip.wav", tone(0.005), SAMPLE_RATE)  # 5 ms: under the 25 ms of one audio token
    nan = tone(0.5)
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    sf.write(folder / "loud.wav", tone(0.5, amplitude=3.0), SAMPLE_RATE, subtype="FLOAT")
    (folder / "corrupt.wav").write_bytes(b"RIFF this is not audio at all" * 20)
    (folder / "absurd.wav").write_bytes(wav_header(1, 3200) + bytes(3200))  # 1 Hz: "1,600 s"
    sf.write(folder / "too_long.wav", tone(MAX_SECONDS + 5), SAMPLE_RATE)
    sf.write(folder / "clipped.wav", np.clip(tone(0.5, amplitude=2.0), -1, 1), SAMPLE_RATE)
    sf.write(folder / "stereo48k.wav", np.stack([tone(0.6, rate=48_000)] * 2, axis=1), 48_000)
    sf.write(folder / "long.wav", tone(31.0), SAMPLE_RATE)
    return {"silent": "silent.wav", "empty": "empty.wav", "too_short": "blip.wav", "nonfinite": "nan.wav", "out_of_range": "loud.wav",
            "unreadable": "corrupt.wav", "absurd_header": "absurd.wav", "too_long": "too_long.wav",
            "missing": "nowhere.wav", "clipped": "clipped.wav", "resampled": "stereo48k.wav",
            "multichannel": "stereo48k.wav", "chunked": "long.wav"}


def chat(audio: str | list[str], question: str = "<audio>What does the speaker say?", answer: str = "a tone") -> dict:
    audios = [audio] if isinstance(audio, str) else audio
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "audios": audios}


def write_manifest(folder: Path) -> tuple[Path, dict[int, set[str]]]:
    """Good rows and one row per problem class; returns the manifest and {line: expected kinds}."""
    for i in range(GOOD_ROWS):
        sf.write(folder / f"good{i}.wav", tone(0.5 + 0.05 * i, 150 + 30 * i), SAMPLE_RATE)
    files = write_bad_audio(folder)
    sf.write(folder.parent / "outside.wav", tone(0.5), SAMPLE_RATE)
    lines: list[bytes] = []
    expected: dict[int, set[str]] = {}

    def add(row, kinds=()):
        lines.append(row if isinstance(row, bytes) else json.dumps(row).encode())
        expected[len(lines)] = set(kinds)

    for i in range(GOOD_ROWS):
        add(chat(f"good{i}.wav"))
    for kind in ("silent", "empty", "too_short", "nonfinite", "out_of_range", "unreadable", "absurd_header", "too_long",
                 "missing"):
        add(chat(files[kind]), [kind])
    add(chat("clipped.wav"), ["clipped"])
    add(chat("stereo48k.wav"), ["resampled", "multichannel"])
    add(chat("long.wav"), ["chunked"])
    add(chat("good0.wav", question="<audio><audio>Compare them."), ["placeholder_mismatch"])
    add(chat("good1.wav", answer=""), ["empty_assistant"])
    add(chat("good2.wav", answer=None), ["empty_assistant"])
    add(chat("good3.wav", answer="word " * 2000), ["over_length"])
    add(chat("../outside.wav"), ["escapes_root"])
    add(b'{"messages": "caf\xe9 in latin-1"}', ["non_utf8"])
    add(b'{"messages": [', ["bad_json"])
    manifest = folder / "train.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest, expected


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "data"
    folder.mkdir()
    return write_manifest(folder)


def errors_of(expected: dict[int, set[str]]) -> dict[str, int]:
    """{kind: rows} of the error kinds among the expected ones (the rows training skips)."""
    from audiollm.data_check import KINDS

    counts: dict[str, int] = {}
    for kinds in expected.values():
        for kind in kinds:
            if KINDS[kind][0] == "error":
                counts[kind] = counts.get(kind, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------------- data check


def test_data_check_reports_every_class_with_its_row(bad_data, tmp_path, capsys):
    from audiollm.cli import main

    manifest, expected = bad_data
    report, clean = tmp_path / "report.json", tmp_path / "clean" / "clean.jsonl"
    clean.parent.mkdir()
    status = main(["data", "check", str(manifest), "--max-length", str(MAX_LENGTH), "--max-audio-seconds",
                   str(MAX_SECONDS), "--data-root", str(manifest.parent), "--workers", "2", "--json", str(report),
                   "--fix-out", str(clean)])
    assert status == 1  # errors found
    found = {p["line"]: {kind for kind, _ in p["problems"]} for p in json.loads(report.read_text())["problems"]}
    assert found == {line: kinds for line, kinds in expected.items() if kinds}
    out = capsys.readouterr().out
    for kind in errors_of(expected):
        assert f"train.jsonl:" in out and kind in out
    assert f"train.jsonl:{GOOD_ROWS + 1} (train.jsonl:{GOOD_ROWS + 1})" in out  # the first bad row, named by file and line

    kept = [json.loads(line) for line in clean.read_text().splitlines()]
    usable = [line for line, kinds in expected.items() if not errors_of({line: kinds})]
    assert len(kept) == len(usable)
    assert all(not Path(a).is_absolute() and (clean.parent / a).is_file() for row in kept for a in row["audios"])
    rerun = main(["data", "check", str(clean), "--max-length", str(MAX_LENGTH), "--max-audio-seconds",
                  str(MAX_SECONDS), "--workers", "2"])
    assert rerun == 0  # the cleaned manifest has no errors left


def test_exact_token_count_with_a_model(tmp_path):
    from audiollm.build import build_tiny
    from audiollm.data_check import CheckOptions, check_manifests
    from audiollm.data_check_cli import _collator

    build_tiny(tmp_path / "model")
    sf.write(tmp_path / "a.wav", tone(1.0), SAMPLE_RATE)
    (tmp_path / "m.jsonl").write_text(json.dumps(chat("a.wav", answer="yes " * 40)) + "\n")
    collator = _collator(str(tmp_path / "model"))
    exact = len(collator.encode({**chat(str(tmp_path / "a.wav"), answer="yes " * 40), "id": "x"}, 0).input_ids)
    fits = check_manifests([str(tmp_path / "m.jsonl")], CheckOptions(exact, collator=collator), progress=False)
    over = check_manifests([str(tmp_path / "m.jsonl")], CheckOptions(exact - 1, collator=collator), progress=False)
    assert fits[0].problems == [] and [k for k, _ in over[0].problems] == ["over_length"]


def test_unparseable_lines_are_left_out_without_writing_beside_the_manifest(tmp_path):
    from audiollm.bad_rows import BadRowLog
    from audiollm.data import load_manifest

    folder = tmp_path / "data"
    folder.mkdir()
    sf.write(folder / "a.wav", tone(0.5), SAMPLE_RATE)
    (folder / "m.jsonl").write_bytes(json.dumps(chat("a.wav")).encode() + b"\n{broken\n" +
                                     json.dumps(chat("a.wav", answer="again")).encode() + b"\n")
    before = sorted(p.name for p in folder.iterdir())
    log = BadRowLog()
    ds = load_manifest(str(folder / "m.jsonl"), bad_rows=log)
    assert sorted(p.name for p in folder.iterdir()) == before  # the folder may be read-only: nothing written there
    assert ds["id"] == ["m.jsonl:1", "m.jsonl:3"]  # rows keep their line numbers
    assert ds["audios"] == [[str(folder / "a.wav")]] * 2  # relative paths resolve against the manifest's folder
    assert log.total_bad == 1


# ------------------------------------------------------------------------------------------------------- training


def sft_recipe(tmp_path: Path, manifest: Path, **changes) -> list[str]:
    from audiollm.build import build_tiny

    model = tmp_path / "init"
    if not model.exists():
        build_tiny(model)
    recipe = yaml.safe_load((REPO_ROOT / "stages" / "configs" / "sft.yaml").read_text())
    recipe.pop("mix_weights", None)
    recipe.update(model_name_or_path=str(model), train_files=[str(manifest)], output_dir=str(tmp_path / "run"),
                  bf16=False, use_cpu=True, max_steps=3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, warmup_steps=0, logging_steps=1, save_steps=100,
                  dataloader_num_workers=0, report_to="none", train_sampling_strategy="random",
                  max_length=MAX_LENGTH, max_audio_seconds=MAX_SECONDS, data_root=str(manifest.parent))
    recipe.update(changes)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    return ["--config", str(tmp_path / "sft.yaml")]


def test_training_skips_and_counts_every_bad_row(bad_data, tmp_path):
    """One epoch visits every row (3 steps of a third of the rows); the summary counts each bad row once, by kind,
    the unparseable lines included, and the run finishes with a model."""
    from stages.sft import main

    manifest, expected = bad_data
    rows = len(expected)
    main(sft_recipe(tmp_path, manifest, max_bad_fraction=0.9, max_steps=-1, num_train_epochs=1,
                    per_device_train_batch_size=rows // 3))
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())["stages"][-1]
    assert summary["bad_rows_skipped"] == errors_of(expected)
    assert read_bad_rows(str(tmp_path / "run")) == errors_of(expected)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_too_many_bad_rows_stop_before_training(bad_data, tmp_path):
    from stages.sft import main

    manifest, _ = bad_data
    with pytest.raises(TooManyBadRows, match=r"are bad, more than max_bad_fraction=0.1.*audiollm data check"):
        main(sft_recipe(tmp_path, manifest, max_bad_fraction=0.1))
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # stopped before the first step


def test_dpo_skips_bad_pairs_and_an_all_bad_batch_trains_nothing(tmp_path):
    """Batch size 1: the step of the bad pair has no usable row at all; the run still finishes, every logged loss
    is finite, and the pairs are counted by kind."""
    from audiollm.build import build_tiny
    from stages.dpo import main

    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(4):
        sf.write(folder / f"q{i}.wav", tone(0.5 + 0.1 * i, 200 + 40 * i), SAMPLE_RATE)
        rows.append({"messages": [{"role": "user", "content": "<audio>What does the speaker say?"}],
                     "audios": [f"q{i}.wav"], "chosen": f"word {i}", "rejected": f"other {i}"})
    sf.write(folder / "silent.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    rows += [{**rows[0], "audios": ["silent.wav"]}, {**rows[1], "chosen": None}]
    (folder / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tiny(tmp_path / "init")
    recipe = yaml.safe_load((REPO_ROOT / "stages" / "configs" / "dpo.yaml").read_text())
    recipe.update(model_name_or_path=str(tmp_path / "init"), train_files=[str(folder / "dpo.jsonl")],
                  output_dir=str(tmp_path / "run"), bf16=False, use_cpu=True, max_steps=-1, num_train_epochs=1,
                  per_device_train_batch_size=1, gradient_accumulation_steps=1, warmup_steps=0, logging_steps=1,
                  save_strategy="no", dataloader_num_workers=0, report_to="none", max_length=512,
                  max_bad_fraction=0.5, precompute_ref_log_probs=False)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    main(["--config", str(tmp_path / "dpo.yaml")])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == len(rows) and all(np.isfinite(losses))
    assert read_bad_rows(str(tmp_path / "run")) == {"silent": 1, "empty_assistant": 1}
