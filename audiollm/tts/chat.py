"""Speech to speech: a spoken question in, a spoken answer out.

    mode="listen"   the audio LLM hears the question and answers in text; the TTS decoder voices the answer
    mode="cascade"  the baseline: Whisper transcribes, a text LLM answers the transcript, the TTS decoder voices it

Both modes share the answer settings and the TTS step, so their outputs compare like for like. The cascade's text
LLM defaults to the listener's own LLM (prompted with the transcript instead of audio), so the comparison isolates
listening from transcribing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from audiollm.chat import AUDIO_MARKER

MODES = ("listen", "cascade")
ANSWER_TOKENS = 64  # longest text answer


@dataclass
class ChatReply:
    """The reply's text, its transcript of the question (cascade only) and its voice (when a TTS is given)."""

    text: str
    transcript: str | None = None
    wav: np.ndarray | None = None
    sample_rate: int | None = None


def answer(model, tokenizer, messages: list[dict], audios: list, max_new_tokens: int = ANSWER_TOKENS,
           streamer=None) -> str:
    """Greedy answer of an audiollm model to a chat (prompt built by the training collator, as eval does).

    ``streamer`` (a transformers ``TextStreamer``) receives the new tokens as they are generated.
    """
    from audiollm.collator import ChatCollator
    from eval.generate import GenerationSettings, NO_LENGTH_LIMIT, _on_device, stop_ids

    collator = ChatCollator(tokenizer, max_length=NO_LENGTH_LIMIT, stack=model.config.projector_stack,
                            generation=True)
    batch = _on_device(collator([{"messages": messages, "audios": audios}]), model)
    ids = model.generate(**batch, **GenerationSettings(max_new_tokens=max_new_tokens).kwargs(),
                         eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    return tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def text_llm_answer(folder: str, question: str, max_new_tokens: int = ANSWER_TOKENS) -> str:
    """Greedy answer of a plain HF causal LM (with a chat template) to a text question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat(listener_dir: str, audio: str, tts_dir: str | None = None, out_wav: str | None = None,
         mode: str = "listen", asr_model: str | None = None, text_llm: str | None = None) -> ChatReply:
    """Answer the spoken question in ``audio`` and, with ``tts_dir``, voice the answer (written to ``out_wav``).

    cascade needs ``asr_model`` (an OpenAI Whisper .pt or HF Whisper folder); ``text_llm`` (a causal-LM folder)
    replaces the listener's LLM as the text answerer.
    """
    from audiollm.audio_sources import load_audio
    from eval.generate import load_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    transcript = None
    if mode == "listen":
        model, tokenizer = load_model(listener_dir)
        text = answer(model, tokenizer, [{"role": "user", "content": AUDIO_MARKER}], [load_audio(audio)])
    else:
        if asr_model is None:
            raise ValueError("mode='cascade' needs asr_model: a Whisper checkpoint (.pt or HF folder)")
        from eval.speech import load_transcriber

        transcript = load_transcriber(asr_model).transcribe([load_audio(audio)])[0]
        if text_llm:
            text = text_llm_answer(text_llm, transcript)
        else:
            model, tokenizer = load_model(listener_dir)
            text = answer(model, tokenizer, [{"role": "user", "content": transcript}], [])
    reply = ChatReply(text, transcript)
    if tts_dir:
        from audiollm.tts.generate import speak

        spoken = speak(tts_dir, text or ".", out_wav=out_wav)
        reply.wav, reply.sample_rate = spoken.wav, spoken.sample_rate
    return reply
