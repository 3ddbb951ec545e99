"""The real-size smoke run's code path on tiny shapes (CPU): HF folders written, joined by ``audiollm init``, trained
by stages/sft.py with the shipped recipe; the report holds one finite loss per step."""

import json

from benchmarks import real_size_smoke


def test_tiny_smoke_trains_the_shipped_sft_recipe(tmp_path):
    report = real_size_smoke.main(["--out", str(tmp_path / "run"), "--tiny", "--steps", "2", "--batch", "2",
                                   "--json", str(tmp_path / "smoke.json")])
    assert report["losses_finite"] and len(report["losses"]) == 2 and report["shape"] == "tiny"
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report)) and "--tiny" in saved["command"]
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # the audiollm init folder the stage trained
