"""Planned clips -> 16 kHz wav files, synthesised shard by shard, each shard in a fresh process.

espeak's wave generator keeps state from one utterance to the next (``audiollm.synth.espeak``), so the same clip
sounds slightly different depending on what the process said before. A fresh process per fixed-size shard makes a
build byte-identical to any other with the same plan, whatever the core count.

A clip is ``(audio, text, voice, rate, pitch[, vowels[, formant_scale[, phoneme_table]]])``: its path relative to
the output folder, what is said, the espeak voice ("en+f1"), words per minute, pitch (0-100), optionally the vowel
moves of an accent of its own (``audiollm.synth.accents``; spoken from the voice's own phonemes with those vowels
moved), a factor on the voice's formant frequencies and another phoneme table for its accent
(``audiollm.synth.espeak.composed_voice``; 1 and "" keep the voice as shipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from audiollm.synth.espeak import SAMPLE_RATE, EspeakError

SHARD_CLIPS = 2_000  # clips per synthesis process; fixed, so the audio does not depend on the core count


def render(clips: list[tuple], root: Path) -> tuple[list[int], str, list[list[float]]]:
    """Synthesise every clip under ``root``: shards of SHARD_CLIPS, each in a fresh process, up to one per core.

    Returns the samples of each clip (in order), espeak's version and each clip's word starts (seconds).
    """
    shards = [clips[i : i + SHARD_CLIPS] for i in range(0, len(clips), SHARD_CLIPS)]
    with ThreadPoolExecutor(min(len(shards), os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda shard: _render_shard(shard, root), shards))
    samples = [n for result in results for n in result["samples"]]
    return samples, results[0]["espeak"], [starts for result in results for starts in result["word_starts"]]


def _render_shard(shard: list[tuple], root: Path) -> dict:
    """Run this module as a worker (``python -m audiollm.synth.render``) on one shard; the job goes in on stdin."""
    job = {"root": str(Path(root).resolve()), "clips": [list(clip) for clip in shard]}
    # The worker must import this very audiollm: `python -m` puts its working folder first on sys.path, so it runs
    # in the folder above this package (another checkout in the caller's folder would otherwise win).
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-m", "audiollm.synth.render"], input=json.dumps(job), capture_output=True,
                          text=True, env=env, cwd=package_parent)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise EspeakError(f"speech synthesis failed in a worker process: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _render_worker() -> None:
    """Worker side of ``_render_shard``: synthesise the job's clips in order and write 16 kHz PCM_16 wavs."""
    import numpy as np
    import soundfile

    from audiollm.synth.accents import speak_with_accent
    from audiollm.synth.espeak import Espeak, version

    job = json.load(sys.stdin)
    engine, samples, word_starts = Espeak(), [], []
    for audio, text, voice, rate, pitch, *extra in job["clips"]:
        vowels = extra[0] if extra else {}
        formant_scale = extra[1] if len(extra) > 1 else 1.0
        sound = {"formant_scale": formant_scale, "phoneme_table": extra[2] if len(extra) > 2 else ""}
        if vowels:
            said = speak_with_accent(engine.phonemes(text, voice), vowels)
            wav, starts = engine.synth_words(said, voice, rate, pitch, phonemes=True, **sound)
        else:
            wav, starts = engine.synth_words(text, voice, rate, pitch, **sound)
        wav = np.clip(wav, -1.0, 1.0)  # resampling can overshoot full scale
        path = Path(job["root"]) / audio
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, wav, SAMPLE_RATE, subtype="PCM_16")
        samples.append(len(wav))
        word_starts.append(starts)
    print(json.dumps({"samples": samples, "espeak": version(), "word_starts": word_starts}))


if __name__ == "__main__":
    _render_worker()
