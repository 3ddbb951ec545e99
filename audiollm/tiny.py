"""A tiny tokenizer and model configs, built offline, for tests and the CPU demo.

The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer split pattern and Qwen's special tokens, trained in a
fraction of a second on a fixed word list, so it is deterministic and needs no download. The model configs are
Qwen2-Audio's shapes scaled down (a few hundred thousand parameters).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from audiollm.chat import AUDIO_SPECIAL_TOKENS, CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START

TINY_VOCAB_SIZE = 1024
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred"
).split()
CORPUS_WORDS = NUMBER_WORDS + (
    "what is plus minus times comes after before the a an and or of to in it this that how many words does "
    "speaker say repeat first second third last word transcribe audio speech language sex male female man woman "
    "english french german spanish slow fast low high pitch rate voice question answer yes no count from up "
    "please tell me which who said sound clip you are helpful assistant system user describe caption hello "
    "world good morning thank thanks sorry color red green blue cat dog bird house car tree water sun moon"
).split()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the words above, with ``<|endoftext|>`` (pad), ``<|im_end|>`` (eos) and audio tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [ENDOFTEXT, IM_START, IM_END, *AUDIO_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(CORPUS_WORDS[i:] + CORPUS_WORDS[:i]) for i in range(len(CORPUS_WORDS))]
    lines += [w.capitalize() + "." for w in CORPUS_WORDS] + [f"{n}?" for n in range(100)]
    tok.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, *AUDIO_SPECIAL_TOKENS],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# (width, layers) of both the encoder and the LLM. "test": fast unit tests (~0.4 M parameters); "demo": enough
# capacity to learn the synthesised corpus on a laptop CPU in minutes (~2 M parameters).
TINY_SIZES = {"test": (64, 2), "demo": (128, 4)}


def tiny_text_config(vocab_size: int, model_type: str = "qwen2", tie: bool = False, size: str = "test") -> dict:
    """A small causal LM config of the given family (qwen2 covers Qwen2 and Qwen2.5; qwen3 adds q/k norms)."""
    width, layers = TINY_SIZES[size]
    return dict(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
    )


def tiny_audio_config(size: str = "test") -> dict:
    """Whisper-large-v3's encoder shape (128 mels, 1500 positions), scaled down in width and depth."""
    width, layers = TINY_SIZES[size]
    return dict(
        model_type="qwen2_audio_encoder",
        num_mel_bins=128,
        d_model=width,
        encoder_layers=layers,
        encoder_attention_heads=4,
        encoder_ffn_dim=2 * width,
        max_source_positions=1500,
    )
