"""Natural-language instruction pools for audio-text pretraining (stage 1).

Qwen2-Audio replaced Whisper-style task tags with plain instructions, so the model learns to follow the wording
rather than a tag. A pretraining row names its task; each row draws one instruction from that task's pool,
deterministically from the seed and the row's id, so a rerun (or a resume) sees the same prompts.
"""

from __future__ import annotations

import random

PROMPT_POOLS: dict[str, tuple[str, ...]] = {
    "asr": (
        "Transcribe the speech.",
        "Write down exactly what is said.",
        "What does the speaker say? Give the exact words.",
        "Convert this recording to text.",
        "Please transcribe this audio.",
        "Give me a transcript of the speech.",
    ),
    "caption": (
        "Describe the audio.",
        "What can you hear in this recording?",
        "Write a short caption for this sound.",
        "Summarise what happens in the audio.",
    ),
    "sound": (
        "What sound is this?",
        "Name the sound you hear.",
        "Which sound event is in this clip?",
    ),
    "sex": (
        "Is the speaker male or female?",
        "What is the sex of the speaker?",
        "Does this voice sound male or female?",
    ),
    "language": (
        "What language is spoken?",
        "Which language does the speaker use?",
        "Identify the language of this speech.",
    ),
    "rate": (
        "Is the speaker talking slowly or fast?",
        "How fast does the speaker talk: slow or fast?",
        "Describe the speaking rate as slow or fast.",
    ),
    "pitch": (
        "Is the speaker's voice high or low?",
        "Describe the pitch of the voice as low or high.",
        "Does the speaker have a low or a high voice?",
    ),
    "emotion": (
        "What emotion does the speaker express?",
        "How does the speaker feel?",
        "Recognise the emotion in this voice.",
    ),
    "age": (
        "How old does the speaker sound?",
        "Estimate the speaker's age group.",
    ),
}


def pick_prompt(task: str, row_id: str, seed: int = 0) -> str:
    """One instruction from ``task``'s pool, fixed for a (seed, row id) pair."""
    if task not in PROMPT_POOLS:
        raise KeyError(f"no prompt pool for task {task!r}; known tasks: {', '.join(sorted(PROMPT_POOLS))}")
    pool = PROMPT_POOLS[task]
    return pool[random.Random(f"{seed}:{row_id}").randrange(len(pool))]
