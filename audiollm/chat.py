"""The chat template: ChatML with Qwen2-Audio's numbered audio lines. This module owns every prompt string.

A conversation renders as::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nWhat is this sound?<|im_end|>\\n
    <|im_start|>assistant\\nA dog barking.<|im_end|>\\n

Manifests mark audio with ``<audio>`` inside string content (LLaMA-Factory / ms-swift style); the Jinja template
written into saved tokenizers and processors also takes Hugging Face content lists
(``[{"type": "audio"}, {"type": "text", "text": ...}]``), so stock ``apply_chat_template`` renders the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_SPECIAL_TOKENS = (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AUDIO_MARKER = "<audio>"  # how manifests mark where a clip goes
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def audio_line(number: int) -> str:
    """The text that stands for the ``number``-th clip (1-based) of a conversation."""
    return f"Audio {number}: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}\n"


CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{% set pieces = message['content'].split('<audio>') %}"
    "{% for piece in pieces %}"
    "{% if not loop.first %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% endif %}"
    "{{ piece }}"
    "{% endfor %}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass
class Segment:
    """A piece of rendered text and whether its tokens are trained on (labels) or only read (-100)."""

    text: str
    train: bool


def render_segments(
    messages: list[dict],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    train_on: str = "all",
) -> list[Segment]:
    """Render a conversation into segments; joined, they equal ``CHAT_TEMPLATE``'s output.

    ``train_on``: "all" trains on every assistant turn, "last" on the final one only. A trained turn covers the
    answer and its ``<|im_end|>`` (so the model learns to stop), never the ``<|im_start|>assistant\\n`` header.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    segments, audio_count = [], 0
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        segments.append(Segment(f"{IM_START}system\n{system_prompt}{IM_END}\n", False))
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(messages):
        pieces = message["content"].split(AUDIO_MARKER)
        body = pieces[0]
        for piece in pieces[1:]:
            audio_count += 1
            body += audio_line(audio_count) + piece
        trained = message["role"] == "assistant" and (train_on == "all" or i == last_assistant)
        segments.append(Segment(f"{IM_START}{message['role']}\n", False))
        segments.append(Segment(f"{body}{IM_END}", trained))
        segments.append(Segment("\n", False))
    if add_generation_prompt:
        segments.append(Segment(f"{IM_START}assistant\n", False))
    return segments


def count_audio_markers(messages: list[dict]) -> int:
    return sum(m["content"].count(AUDIO_MARKER) for m in messages)
