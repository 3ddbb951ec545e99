"""What the demo corpus says and who says it (``audiollm data synth``): every row of every split planned, with the
clips it needs, before anything is synthesised. ``audiollm.synth.build`` synthesises the clips and writes the corpus.

What is said is small on purpose, so a tiny model can learn it in minutes: number words, colours and a few nouns
(words the tiny tokenizer knows), short questions and short answers. The held-out split never repeats a training
utterance (each distinct text belongs to one split, by a hash of the seed and the text) and is spoken only by voice
variants and English accents that training never uses; the builder checks both. The validation split has
utterances, voices and accents of its own too: recipe choices are made on it, so that the held-out figures stay
untuned. The plan depends on the seed and size only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from audiollm.chat import AUDIO_MARKER
from audiollm.synth.accents import draw_accent
from audiollm.synth.questions import (
    NUMBER_WORDS, all_facts, fact_answer, fact_sentences, off_by_one, random_statement, spoken_question,
)
from audiollm.synth.splits import CorpusError, question_splits, split_counts, text_split
from audiollm.synth.voices import (
    ACCENTS, FORMANT_RANGE, PHONEME_TABLES, PITCH_HIGH, PITCH_LOW, PITCH_NORMAL, RATE_FAST, RATE_NORMAL, RATE_SLOW,
    TABLE_SHARE, VARIANTS, VOWEL_SHARE,
)

MANIFESTS = ("pretrain", "sft", "dpo")
MAX_DRAWS = 10_000  # tries to draw an utterance of the wanted split before the pool counts as exhausted
RAMBLE_SHARE = 0.3  # rejected answers that ramble instead of being plausibly wrong

WORDS_PER_CLIP = (2, 4)  # pretraining utterances
# The corpus's texts are words spoken one after another ("eight seventeen four", "six seven eight nine"), so each
# word is a unit of WER. Whisper's English normaliser alone reads a run of number words as one number ("6789"):
# one misheard word would cost the whole run, and the run would count once (eval.metrics.ASR_NORMALIZERS).
WER_NORMALIZER = "words"
WORDS_PER_ANALYSIS = (2, 5)  # clips asked about ("how many words")

LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}
WORDS = {
    "en": NUMBER_WORDS[1:] + "red green blue cat dog bird house car tree water sun moon".split(),
    "fr": "un deux trois quatre cinq six sept huit neuf dix rouge vert bleu chat chien oiseau maison voiture "
    "arbre eau soleil lune".split(),
    "de": "eins zwei drei vier fünf sechs sieben acht neun zehn rot grün blau Katze Hund Vogel Haus Auto Baum "
    "Wasser Sonne Mond".split(),
    "es": "uno dos tres cuatro cinco seis siete ocho nueve diez rojo verde azul gato perro pájaro casa coche "
    "árbol agua sol luna".split(),
}
# Classification tasks: label -> how its clips are spoken (language, sex, rate range, pitch range).
LABELS = {
    "sex": {"female": {"sex": "female"}, "male": {"sex": "male"}},
    "language": {name: {"language": code} for code, name in LANGUAGES.items()},
    "rate": {"slow": {"rate": RATE_SLOW}, "fast": {"rate": RATE_FAST}},
    "pitch": {"low": {"pitch": PITCH_LOW}, "high": {"pitch": PITCH_HIGH}},
}
ANALYSIS_QUESTIONS = {
    "count": "How many words does the speaker say?",
    "first": "What is the first word?",
    "second": "Repeat the second word.",
    "last": "What is the last word?",
}


@dataclass(frozen=True)
class Clip:
    """One utterance to synthesise; ``audio`` is relative to the corpus folder."""

    audio: str
    split: str
    text: str
    language: str
    voice: str
    sex: str
    rate: int  # words per minute
    pitch: int  # espeak 0-100
    vowels: dict[str, str] = field(default_factory=dict)  # vowel moves of the clip's own accent (synth/accents.py)
    formant_scale: float = 1.0  # on the voice's formant frequencies (its own vocal tract; synth/voices.py)
    phoneme_table: str = ""  # another accent's phoneme table for the voice's accent ("": its own; synth/voices.py)


@dataclass
class Exchange:
    """A chat prompt (turns up to the last user turn), its clips, the right answer and plausible wrong ones."""

    prompt: list[dict]
    audios: list[str]
    answer: str
    wrong: list[str] = field(default_factory=list)


class Speaker:
    """Draws what one split says and who says it, and records every clip it creates."""

    def __init__(self, split: str, seed: int, vowel_share: float = VOWEL_SHARE,
                 formant_range: tuple[float, float] = FORMANT_RANGE, table_share: float = TABLE_SHARE):
        self.split, self.seed = split, seed
        self.vowel_share = vowel_share if split == "train" else 0.0  # made-up accents: training clips only
        self.formant_range = formant_range if split == "train" else (1.0, 1.0)  # and made-up vocal tracts
        self.table_share = table_share if split == "train" else 0.0  # and accents that mix two of training's
        self.clips: list[Clip] = []

    def rng(self, name: str) -> random.Random:
        """A generator per (seed, split, row kind): changing one kind's count never shifts another's draws."""
        return random.Random(f"{self.seed}:{self.split}:{name}")

    def draw(self, rng: random.Random, make, accept=None):
        """``make(rng)`` until ``accept`` takes what it made; by default, until it is an utterance of this split."""
        accept = accept or (lambda text: text_split(text, self.seed) == self.split)
        for _ in range(MAX_DRAWS):
            item = make(rng)
            if accept(item):
                return item
        raise CorpusError(f"no {self.split} utterance in {MAX_DRAWS} draws: too few possible utterances to split")

    def question(self, rng: random.Random) -> tuple[str, str, list[str]]:
        """A spoken question in one of this split's sentences: (sentence, answer, plausible wrong answers)."""

        def mine(sentences: tuple[str, ...]) -> list[str]:
            splits = question_splits(sentences, self.seed)
            return [sentence for sentence in sentences if splits[sentence] == self.split]

        return self.draw(rng, lambda r: spoken_question(r, mine), accept=lambda qa: qa is not None)

    def clip(self, rng: random.Random, text: str, language="en", sex=None, rate=RATE_NORMAL, pitch=PITCH_NORMAL):
        """Plan a clip of ``text`` by a voice of this split; returns its path."""
        sex = sex or rng.choice(("female", "male"))
        variant = rng.choice(VARIANTS[self.split][sex])
        path = f"audio/{self.split}/{len(self.clips):05d}.wav"
        accent = rng.choice(ACCENTS[self.split]) if language == "en" else language
        voice = f"{accent}+{variant}"
        words_per_minute, pitch = rng.randint(*rate), rng.randint(*pitch)
        vowels = {}
        if language == "en" and self.vowel_share:  # its own generator: the share never changes what is said
            vowels = draw_accent(self.rng(f"accent {path}"), self.vowel_share)
        scale = 1.0
        if self.formant_range != (1.0, 1.0):  # its own generator too
            scale = round(self.rng(f"formants {path}").uniform(*self.formant_range), 3)
        table = self.other_table(path, accent) if language == "en" else ""
        self.clips.append(Clip(path, self.split, text, language, voice, sex, words_per_minute, pitch, vowels, scale,
                               table))
        return path

    def other_table(self, path: str, accent: str) -> str:
        """With probability ``table_share``, the phoneme table of another training accent than ``accent`` (its own
        generator, so the share changes nothing else); otherwise "" (the accent's own)."""
        if not self.table_share:  # the default: no generator made for each of ~32,000 clips
            return ""
        rng = self.rng(f"table {path}")
        if rng.random() >= self.table_share:
            return ""
        return PHONEME_TABLES[rng.choice([a for a in ACCENTS["train"] if a != accent])]


def read_jsonl(path: Path) -> list[dict]:
    """A manifest of the corpus (or one the demo derives from it), one JSON object per line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def words_text(rng: random.Random, language: str = "en", span: tuple[int, int] = WORDS_PER_CLIP) -> str:
    """A few random words of ``language``, e.g. ``"seven red cat"``."""
    return " ".join(rng.choice(WORDS[language]) for _ in range(rng.randint(*span)))


def analysis_text(rng: random.Random) -> str:
    return words_text(rng, "en", WORDS_PER_ANALYSIS)


def ask_about(words: list[str], kind: str) -> tuple[str, str, list[str]]:
    """An analysis question about a clip of ``words``: (question, answer, plausible wrong answers)."""
    if kind == "count":
        answer = NUMBER_WORDS[len(words)]
        return ANALYSIS_QUESTIONS[kind], answer, off_by_one(answer)
    answer = {"first": words[0], "second": words[1], "last": words[-1]}[kind]
    others = [w for w in dict.fromkeys(words) if w != answer]  # the clip's other words, first seen first
    vocab = WORDS["en"]
    return ANALYSIS_QUESTIONS[kind], answer, others or [vocab[(vocab.index(answer) + 1) % len(vocab)]]


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def voice_chat(s: Speaker, rng: random.Random) -> Exchange:
    """The question is only spoken: the user turn is the clip and nothing else."""
    question, answer, wrong = s.question(rng)
    return Exchange([user(AUDIO_MARKER)], [s.clip(rng, question)], answer, wrong)


def analysis(s: Speaker, rng: random.Random) -> Exchange:
    """A clip of a few words and a text instruction about it."""
    text = s.draw(rng, analysis_text)
    question, answer, wrong = ask_about(text.split(), rng.choice(list(ANALYSIS_QUESTIONS)))
    return Exchange([user(AUDIO_MARKER + question)], [s.clip(rng, text)], answer, wrong)


def multi_turn_voice(s: Speaker, rng: random.Random) -> Exchange:
    """Two spoken questions, one clip per user turn."""
    first, second = voice_chat(s, rng), voice_chat(s, rng)
    prompt = first.prompt + [assistant(first.answer)] + second.prompt
    return Exchange(prompt, first.audios + second.audios, second.answer, second.wrong)


def multi_turn_followup(s: Speaker, rng: random.Random) -> Exchange:
    """A question about a clip, then a text-only follow-up about the same clip."""
    text = s.draw(rng, analysis_text)
    first, second = rng.sample(list(ANALYSIS_QUESTIONS), 2)
    question1, answer1, _ = ask_about(text.split(), first)
    question2, answer2, wrong = ask_about(text.split(), second)
    prompt = [user(AUDIO_MARKER + question1), assistant(answer1), user(question2)]
    return Exchange(prompt, [s.clip(rng, text)], answer2, wrong)


EXCHANGES = {
    "voice_chat": voice_chat,
    "analysis": analysis,
    "multi_turn_voice": multi_turn_voice,
    "multi_turn_followup": multi_turn_followup,
}


def rejected(rng: random.Random, exchange: Exchange) -> str:
    """A plausible wrong answer, or (RAMBLE_SHARE of the time) a hedging ramble around the right one."""
    if exchange.wrong and rng.random() >= RAMBLE_SHARE:
        return rng.choice(exchange.wrong)
    options = [exchange.answer, rng.choice(exchange.wrong or [exchange.answer])]
    rng.shuffle(options)
    return f"well, that is a good question. maybe it is {options[0]} or {options[1]}, it is hard to say"


def taught_answers(seed: int) -> list[str]:
    """The answers of the facts whose every question sentence is a training one: no held-out or validation voice
    chat expects them, so the listener may learn to write them down (``pretrain_rows``) without being taught a
    reply it is later scored on."""
    return [fact_answer(*fact)[0] for fact in all_facts()
            if set(question_splits(fact_sentences(*fact), seed).values()) == {"train"}]


def pretrain_rows(s: Speaker, counts: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """(pretraining rows, reply rows). Pretraining: ASR rows (the words spoken; in training also the reply rows)
    and one row per clip for each classification task, labels in turn. Replies (training only): spoken answers,
    ``taught_answers`` in turn, and ``statement_rows``; ``replies.jsonl`` holds them again so that SFT can replay
    them at a weight of their own.

    Why answers: word lists alone taught the listener no "comes", "plus" or "is", so it could not write down a
    spoken reply ("before twenty comes nineteen" came out as "four twenty car nineteen", even from espeak). A
    listener briefly taught the taught answers too wrote validation replies spoken by espeak right 0.233 of the
    time, against 0.05.

    Only the ASR rows carry a ``transcript`` (CTC targets for the encoder, ``audiollm/ctc.py``): with CTC on the
    classification rows' clips too, validation WER after pretraining was 0.294 and 0.227 (seeds 0, 1), without it
    0.179 and 0.176; the whole demo's validation mean of voice chat, analysis and 1 - WER over the two seeds rose
    from 0.818 to 0.834 (docs/demo_history.md)."""
    rng = s.rng("pretrain:asr")
    rows = []
    for _ in range(counts["asr"]):
        text = s.draw(rng, words_text)
        rows.append({"audio": s.clip(rng, text), "task": "asr", "text": text, "transcript": text})
    answers, rng, replies = taught_answers(s.seed), s.rng("pretrain:answers"), []
    for i in range(counts.get("answers", 0)):  # training only (TRAIN_ONLY)
        text = answers[i % len(answers)]
        replies.append({"audio": s.clip(rng, text), "task": "asr", "text": text, "transcript": text})
    replies += statement_rows(s, counts.get("statements", 0))
    rows += replies
    for task, labels in LABELS.items():
        rng = s.rng(f"pretrain:{task}")
        for i in range(counts[task]):
            label = list(labels)[i % len(labels)]
            how = labels[label]
            text = s.draw(rng, lambda r: words_text(r, how.get("language", "en")))
            rows.append({"audio": s.clip(rng, text, **how), "task": task, "text": label})  # no CTC: see above
    return rows, list(replies)


def statement_rows(s: Speaker, n: int) -> list[dict]:
    """``n`` ASR rows of ``random_statement``s (training only): reply-shaped sentences whose numbers are drawn at
    random, so that writing one down takes hearing its numbers. None is a fact's right answer: those are the
    ``taught_answers`` rows' alone, and the others are replies a held-out or validation row expects.

    Why: taught only true replies, the demo's listener wrote down 0.33 of the validation replies spoken by espeak
    after SFT and DPO (it wrote "three minus one is two" as "three minus two is one"); with half of the answer rows
    made statements instead, 0.77 and 0.98 in two runs (0.97-0.98 after pretraining)."""
    facts = {fact_answer(*fact)[0] for fact in all_facts()}
    rng, rows = s.rng("pretrain:statements"), []
    for _ in range(n):
        text = s.draw(rng, random_statement, accept=lambda t: t not in facts and text_split(t, s.seed) == "train")
        rows.append({"audio": s.clip(rng, text), "task": "asr", "text": text, "transcript": text})
    return rows


def chat_rows(s: Speaker, manifest: str, counts: dict[str, int]) -> list[dict]:
    """SFT rows (prompt + answer) or DPO rows (prompt, chosen, rejected), ``counts[kind]`` of each kind."""
    rows = []
    for kind, n in counts.items():
        rng = s.rng(f"{manifest}:{kind}")
        for _ in range(n):
            ex = EXCHANGES[kind](s, rng)
            if manifest == "sft":  # with what each clip says: a distillation teacher reads the question as text
                spoken = {clip.audio: clip.text for clip in s.clips[-len(ex.audios):]} if ex.audios else {}
                rows.append({"messages": ex.prompt + [assistant(ex.answer)], "audios": ex.audios,
                             "transcripts": [spoken[a] for a in ex.audios]})
            else:
                rows.append({"messages": ex.prompt, "audios": ex.audios, "chosen": ex.answer,
                             "rejected": rejected(rng, ex)})
    return rows


def typed_rows(seed: int, split: str = "train") -> list[dict]:
    """Each fact's sentences of ``split`` typed, with the spoken answer: ``text.jsonl`` (training, ~280 rows),
    ``validation_text.jsonl`` and ``heldout_text.jsonl`` (~30 and ~80); the same for every size.

    A released LLM knows that three plus four is seven before it ever hears a question; the demo's tiny LLM starts
    from random weights and learns it from the training rows (see ``stages/configs/sft_text_demo.yaml``). The other
    splits' rows are only scored: whether the LLM knows the answer in writing, so that the voice-chat figure can be
    read as listening. Only training sentences are trained on, spoken or typed.
    """
    rows = []
    for fact in all_facts():
        sentences, answer = fact_sentences(*fact), fact_answer(*fact)[0]
        splits = question_splits(sentences, seed)
        rows += [{"messages": [user(t), assistant(answer)], "audios": []} for t in sentences if splits[t] == split]
    random.Random(f"{seed}:{split}:text:order").shuffle(rows)
    return rows


def plan_split(split: str, seed: int, size: str, vowel_share: float = VOWEL_SHARE,
               formant_range: tuple[float, float] = FORMANT_RANGE, table_share: float = TABLE_SHARE
               ) -> tuple[dict[str, list[dict]], list[Clip]]:
    """Every row of one split (shuffled per manifest) and the clips they need, without synthesising anything."""
    counts = split_counts(size, split)
    s = Speaker(split, seed, vowel_share, formant_range, table_share)
    rows = dict(zip(("pretrain", "replies"), pretrain_rows(s, counts["pretrain"])))
    for manifest in ("sft", "dpo"):
        rows[manifest] = chat_rows(s, manifest, counts[manifest])
    for manifest, manifest_rows in rows.items():
        random.Random(f"{seed}:{split}:{manifest}:order").shuffle(manifest_rows)
    return rows, s.clips
