"""Offline speech from libespeak-ng through ctypes: text + voice + rate + pitch -> 16 kHz float32 waveform.

The library and its voice data come from the ``espeakng-loader`` wheel, so nothing is installed system-wide and
nothing is downloaded. espeak-ng synthesises 22,050 Hz int16 audio; it is handed to a Python callback chunk by
chunk (synchronous mode: ``espeak_Synth`` returns once the whole utterance has been delivered) and resampled to the
16 kHz the Whisper encoder expects.

Global state, threads and processes: libespeak-ng is one global synthesiser per process (current voice, rate,
pitch, and wave-generator state such as the pitch-flutter phase, the echo buffer and the gain control). This
module initialises it once per process and serialises every synthesis behind one lock, so threads may share an
``Espeak`` but never run in parallel. For parallel work use processes: a spawned process initialises its own
copy, a forked one inherits the parent's, state included.

Determinism: espeak seeds its breath-noise generator from the clock when it initialises; this module reseeds it
with a constant. The wave-generator state (pitch-flutter phase, gain control, echo buffer) still carries over from
one utterance to the next and no API call resets it, so the same (text, voice, rate, pitch) gives slightly
different samples depending on what the process said before. The same sequence of utterances in a fresh process
gives identical samples; ``audiollm.synth.render`` relies on that by synthesising each shard in a fresh process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from types import MappingProxyType

import numpy as np

SAMPLE_RATE_ESPEAK = 22_050  # Hz, what libespeak-ng synthesises
SAMPLE_RATE = 16_000  # Hz, = audiollm.audio.SAMPLE_RATE (not imported: that module pulls in torch)
INT16_SCALE = 32_768.0  # int16 full scale -> float [-1, 1)

RATE_MIN, RATE_MAX = 80, 450  # words per minute that espeak accepts (it clamps silently outside)
RATE_DEFAULT = 175  # words per minute, espeak's default
PITCH_MIN, PITCH_MAX = 0, 100  # espeak's pitch scale; 50 is the voice's own pitch
PITCH_DEFAULT = 50
RANGE_DEFAULT = 50  # pitch range (intonation) 0-100; set every call so one caller's setting never leaks
VOLUME_DEFAULT = 100  # percent
FORMANTS = 9  # a voice file's "formant <n> <frequency %> <height %> <width %>" lines, n = 0-8; 100 % by default
FORMANT_SCALE_MIN, FORMANT_SCALE_MAX = 0.5, 2.0  # formant_scale accepted (a vocal tract half to twice as long)
VOICE_PATH_MAX = 59  # characters of a voice file path that espeak_ng_SetVoiceByFile reads (58 loads, 60 not)
# phontab, the compiled phoneme tables: a 4-byte header whose first byte counts the tables, then per table a 4-byte
# header (first byte: its phoneme count), its name (NUL-padded to 32 bytes) and 16 bytes per phoneme.
PHONTAB_NAME_BYTES, PHONTAB_PHONEME_BYTES = 32, 16

# speak_lib.h constants (ESPEAK_API_REVISION 12, espeak-ng 1.52).
AUDIO_OUTPUT_SYNCHRONOUS = 2  # no audio device; espeak_Synth returns after the callback received everything
INITIALIZE_DONT_EXIT = 0x8000  # report data errors instead of calling exit() inside the library
CHARS_UTF8 = 1  # espeakCHARS_UTF8: the text is UTF-8 (needed for French / German / Spanish letters)
PHONEMES = 0x100  # espeakPHONEMES synth flag: text inside [[ ]] is read as phoneme names
PHONEME_SEPARATOR = "."  # asked of espeak_TextToPhonemes between phoneme names (no English name contains it)
POS_CHARACTER = 1  # espeak_POSITION_TYPE: start position counted in characters (we always start at 0)
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4  # espeak_PARAMETER
EE_OK = 0
RAND_SEED = 0  # replaces the clock seed of espeak's noise generator (breathy variants such as f2, f3, f5)
ESPEAK_ERRORS = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}

EVENT_LIST_TERMINATED, EVENT_WORD = 0, 1  # espeak_EVENT_TYPE: the end of an event list; the start of a word


class Event(ctypes.Structure):
    """speak_lib.h's espeak_EVENT; only word starts are read (``audio_position``: ms into the utterance)."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


# int callback(short *wav, int numsamples, espeak_EVENT *events); return 0 to go on, 1 to abort.
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))


class EspeakError(RuntimeError):
    """A failing espeak call, with the voice and text it was asked for."""


def _declare(lib: ctypes.CDLL) -> None:
    """argtypes / restype of the few functions used: ctypes would otherwise pass every int as C int and
    truncate the size_t / pointer arguments on 64-bit systems."""
    # int espeak_Initialize(espeak_AUDIO_OUTPUT output, int buflength, const char *path, int options)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int  # the sample rate in Hz, or -1 on error
    # void espeak_SetSynthCallback(t_espeak_callback *SynthCallback)
    lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    # espeak_ERROR espeak_SetVoiceByName(const char *name)
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    # espeak_ng_STATUS espeak_ng_SetVoiceByFile(const char *filename): a voice file given by its path
    lib.espeak_ng_SetVoiceByFile.argtypes = [ctypes.c_char_p]
    lib.espeak_ng_SetVoiceByFile.restype = ctypes.c_int
    # espeak_ERROR espeak_SetParameter(espeak_PARAMETER parameter, int value, int relative)
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    # espeak_ERROR espeak_Synth(const void *text, size_t size, unsigned int position,
    #     espeak_POSITION_TYPE position_type, unsigned int end_position, unsigned int flags,
    #     unsigned int *unique_identifier, void *user_data)
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    # const char *espeak_TextToPhonemes(const void **textptr, int textmode, int phonememode): one clause's phonemes;
    # moves *textptr past that clause (NULL at the end). phonememode 0 = ascii names; bits 8-23 = a separator
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    # void espeak_ng_SetRandSeed(long seed): the breath-noise generator, seeded from the clock at initialisation
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    # const char *espeak_Info(const char **path_data): the version string; path_data may be NULL
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p


class _Engine:
    """The process's one libespeak-ng: loaded, declared and initialised on first use."""

    voice_dir: tempfile.TemporaryDirectory | None = None  # composed voice files (formant_scale); gone at exit

    lock = threading.Lock()  # espeak is global state: one utterance at a time per process
    lib: ctypes.CDLL | None = None
    chunks: list[np.ndarray] = []  # int16 chunks of the utterance being synthesised
    word_ms: list[int] = []  # where each word of the utterance starts, in ms of audio
    callback = None  # the ctypes callback object; must stay referenced or espeak calls freed memory


def _on_samples(wav, numsamples: int, events) -> int:
    """espeak's synth callback: copy the chunk (espeak reuses its buffer) and note its word starts; a NULL/0 call
    marks the end."""
    if numsamples > 0 and wav:
        _Engine.chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    i = 0
    while events and events[i].type != EVENT_LIST_TERMINATED:
        if events[i].type == EVENT_WORD:
            _Engine.word_ms.append(events[i].audio_position)
        i += 1
    return 0


def _engine() -> type[_Engine]:
    """Initialise libespeak-ng in this process if not done yet (call with ``_Engine.lock`` held)."""
    if _Engine.lib is not None:
        return _Engine
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    _declare(lib)
    data_path = espeakng_loader.get_data_path()
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), INITIALIZE_DONT_EXIT)
    if rate != SAMPLE_RATE_ESPEAK:
        raise EspeakError(f"espeak_Initialize with data {data_path} returned {rate}, expected {SAMPLE_RATE_ESPEAK} Hz")
    lib.espeak_ng_SetRandSeed(RAND_SEED)
    _Engine.callback = SYNTH_CALLBACK(_on_samples)
    lib.espeak_SetSynthCallback(_Engine.callback)
    _Engine.lib = lib
    return _Engine


@functools.lru_cache(maxsize=1)
def version() -> str:
    """libespeak-ng's version, e.g. ``1.52.0`` (audio is only reproducible within one version)."""
    with _Engine.lock:
        return _engine().lib.espeak_Info(None).decode()


@functools.lru_cache(maxsize=1)
def voice_variants() -> tuple[str, ...]:
    """Names of the voice variants shipped with the data (``f1``..``f5``, ``m1``..``m8``, ``klatt``, ...)."""
    import espeakng_loader

    return tuple(sorted(os.listdir(os.path.join(espeakng_loader.get_data_path(), "voices", "!v"))))


@functools.lru_cache(maxsize=1)
def _language_files() -> dict[str, str]:
    """Language voice name ("en-US", "fr") -> its file under the data's ``lang/`` folder."""
    import espeakng_loader

    root = os.path.join(espeakng_loader.get_data_path(), "lang")
    return {name: os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names}


@functools.lru_cache(maxsize=1)
def phoneme_tables() -> frozenset[str]:
    """The phoneme tables the voice data holds ("en", "en-us", "en-us-nyc", "fr"...), read from its phontab. espeak
    itself takes an unknown table with a message on stderr and speaks garbage, so names are checked against these."""
    import espeakng_loader

    with open(os.path.join(espeakng_loader.get_data_path(), "phontab"), "rb") as f:
        data = f.read()
    names, at = set(), 4
    for _ in range(data[0]):
        name = data[at + 4:at + 4 + PHONTAB_NAME_BYTES]
        names.add(name.split(b"\0", 1)[0].decode("ascii"))
        at += 4 + PHONTAB_NAME_BYTES + data[at] * PHONTAB_PHONEME_BYTES
    return frozenset(names)


def composed_voice(voice: str, formant_scale: float = 1.0, phoneme_table: str = "") -> str:
    """The text of a voice file that speaks as ``voice`` ("en-US+m1") with every formant frequency multiplied by
    ``formant_scale``: the same speaker with a vocal tract 1/formant_scale as long (vocal tract length perturbation,
    done where the formants are made). Pitch, rate and everything else the voice sets are kept.

    ``phoneme_table`` ("en-rp") replaces the language's phoneme table: the accent's rules (which phonemes a word has:
    the dictionary rules and ``replace`` lines its file selects) spoken with another table's sounds. espeak's New
    York voice is exactly that, the American voice with a table of its own. It takes the place of the language's
    ``phonemes`` line, since the ``replace`` lines after it name phonemes of the table then in force; a language
    without one (``en``) gets it after its ``language`` lines.

    It is the language file's lines, then the variant's, so that the variant's settings win as when espeak loads
    ``language+variant``; and like espeak, which forgets the language's formants when it loads a variant, the
    formants come from the variant if there is one. Scaled, all nine are written out (height and width -1 keep
    espeak's own for those the file leaves out; a line for one, even at 100 %, changes a wave-generator voice's
    sound). With a scale of 1 and the language's own table the audio is the named voice's, sample for sample
    (tests/test_synth.py).
    """
    lines, formants = _voice_parts(voice)
    if phoneme_table:
        lines = _with_table(list(lines), phoneme_table, voice)
    if formant_scale != 1.0:  # those left out are at espeak's 100 %; -1 keeps their height and width
        formants = {n: ("100", "-1", "-1") for n in range(FORMANTS)} | dict(formants)
    scaled = [" ".join(["formant", str(n), str(round(int(frequency) * formant_scale)), *rest])
              for n, (frequency, *rest) in sorted(formants.items())]
    return "\n".join([*lines, *scaled]) + "\n"


def language_table(language: str) -> str:
    """The phoneme table a language voice's file names ("en-US-nyc" -> "en-us-nyc"); "" where it names none."""
    tables = [line.split()[1] for line in _voice_parts(language)[0] if line.split()[:1] == ["phonemes"]]
    return tables[0] if tables else ""


def _with_table(lines: list[str], table: str, voice: str) -> list[str]:
    if table not in phoneme_tables():
        raise EspeakError(f"voice {voice!r}: unknown phoneme table {table!r}")
    keys = [line.split()[:1] for line in lines]
    if ["phonemes"] in keys:
        lines[keys.index(["phonemes"])] = f"phonemes {table}"
    else:
        last_language = max(i for i, key in enumerate(keys) if key == ["language"])
        lines.insert(last_language + 1, f"phonemes {table}")
    return lines


@functools.lru_cache(maxsize=None)
def _voice_parts(voice: str) -> tuple[tuple[str, ...], MappingProxyType]:
    """``voice``'s language and variant files, read once per process: their lines other than formants (the
    variant's own name and use left out), and the formants in force, n -> (frequency %, height %, width %, ...).
    Read-only, since the cache hands the same objects to every caller."""
    import espeakng_loader

    language, _, variant = voice.partition("+")
    if language not in _language_files():
        raise EspeakError(f"voice {voice!r}: unknown language voice {language!r}")
    paths = [_language_files()[language]]
    if variant:
        if variant not in voice_variants():
            raise EspeakError(f"voice {voice!r}: unknown voice variant {variant!r}")
        paths.append(os.path.join(espeakng_loader.get_data_path(), "voices", "!v", variant))
    lines, formants = [], {}
    for i, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            for line in f.read().splitlines():
                words = line.split()
                if words[:1] == ["formant"] and len(words) >= 3 and 0 <= int(words[1]) < FORMANTS:
                    if i == len(paths) - 1:  # the variant's, or the language's when there is no variant
                        formants[int(words[1])] = tuple(words[2:])
                elif not (i > 0 and words[:1] in (["name"], ["language"])):
                    lines.append(line)
    return tuple(lines), MappingProxyType(formants)


class Espeak:
    """Text to 16 kHz speech with libespeak-ng.

    >>> wav = Espeak().synth("what is three plus four", voice="en+f3", rate=175, pitch=50)

    ``voice`` is a language voice with an optional variant: ``en``, ``de``, ``fr+m3``, ``en+f4``. ``rate`` is in
    words per minute (80-450), ``pitch`` on espeak's 0-100 scale (50 = the voice's own pitch). Instances share
    the process's one synthesiser (see the module docstring); creating many is free.
    """

    def __init__(self):
        with _Engine.lock:
            _engine()

    def synth(self, text: str, voice: str = "en", rate: int = RATE_DEFAULT, pitch: int = PITCH_DEFAULT,
              formant_scale: float = 1.0, phoneme_table: str = "") -> np.ndarray:
        """Speak ``text``; returns float32 samples at 16 kHz, shape (n,). Raises EspeakError naming voice and text.
        ``formant_scale`` multiplies the voice's formant frequencies: another vocal tract; ``phoneme_table``
        speaks the voice's accent with another table's sounds (``composed_voice``)."""
        return self.synth_words(text, voice, rate, pitch, formant_scale=formant_scale, phoneme_table=phoneme_table)[0]

    def phonemes(self, text: str, voice: str = "en") -> list[list[str]]:
        """How ``voice`` pronounces ``text``: per word, espeak's ascii phoneme names, stress marks attached to the
        phoneme after them (``"three" -> ["T", "r", "'i:"]``). ``"".join`` of a word is what ``[[ ]]`` reads."""
        where = f"voice {voice!r}, text {text!r}"
        if not text.strip():
            raise EspeakError(f"{where}: nothing to say")
        mode = ord(PHONEME_SEPARATOR) << 8
        with _Engine.lock:
            lib = _engine().lib
            self._set_voice(lib, voice, where)
            rest, clauses = ctypes.c_char_p(text.encode("utf-8")), []
            while rest.value:  # one call per clause; espeak moves `rest` on (to NULL after the last)
                clauses.append(lib.espeak_TextToPhonemes(ctypes.byref(rest), CHARS_UTF8, mode).decode())
        return [word.split(PHONEME_SEPARATOR) for clause in clauses for word in clause.split()]

    def synth_words(self, text: str, voice: str = "en", rate: int = RATE_DEFAULT, pitch: int = PITCH_DEFAULT,
                    phonemes: bool = False, formant_scale: float = 1.0, phoneme_table: str = ""
                    ) -> tuple[np.ndarray, list[float]]:
        """``synth``, plus where each word starts (seconds into the audio; one per word espeak spoke, which for
        plain words is one per whitespace-separated word of ``text``). With ``phonemes``, ``text`` is espeak
        phoneme names, words separated by spaces (what ``phonemes`` gives, each word joined)."""
        where = f"voice {voice!r}, text {text!r}"
        if not RATE_MIN <= rate <= RATE_MAX or not PITCH_MIN <= pitch <= PITCH_MAX:
            raise EspeakError(f"{where}: rate must be {RATE_MIN}-{RATE_MAX} words per minute and pitch "
                              f"{PITCH_MIN}-{PITCH_MAX}, got rate {rate}, pitch {pitch}")
        if not FORMANT_SCALE_MIN <= formant_scale <= FORMANT_SCALE_MAX:
            raise EspeakError(f"{where}: formant_scale must be {FORMANT_SCALE_MIN}-{FORMANT_SCALE_MAX}, "
                              f"got {formant_scale}")
        if not text.strip():
            raise EspeakError(f"{where}: nothing to say")
        with _Engine.lock:
            engine = _engine()
            self._set_voice(engine.lib, voice, where, formant_scale, phoneme_table)
            for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, RANGE_DEFAULT),
                                 (PARAM_VOLUME, VOLUME_DEFAULT)):
                _check(engine.lib.espeak_SetParameter(param, int(value), 0), f"espeak_SetParameter({param})", where)
            engine.chunks, engine.word_ms = [], []
            data = (f"[[{text}]]" if phonemes else text).encode("utf-8") + b"\0"  # the size counts the NUL
            flags = CHARS_UTF8 | (PHONEMES if phonemes else 0)
            status = engine.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, flags, None, None)
            _check(status, "espeak_Synth", where)
            chunks, engine.chunks = engine.chunks, []
            starts = [ms / 1000 for ms in engine.word_ms]
        if not chunks:
            raise EspeakError(f"{where}: espeak produced no audio")
        return resample(np.concatenate(chunks).astype(np.float32) / INT16_SCALE), starts

    @staticmethod
    def _set_voice(lib: ctypes.CDLL, voice: str, where: str, formant_scale: float = 1.0, phoneme_table: str = ""
                   ) -> None:
        """Select ``voice``. espeak ignores an unknown variant silently (``en+nope`` speaks plain ``en``) and keeps
        the previous voice after an unknown language, so both are checked here. Another ``formant_scale`` than 1,
        or a ``phoneme_table``, loads a voice file composed for it (``composed_voice``), written once per process
        into a folder of its own."""
        variant = voice.partition("+")[2]
        if variant and variant not in voice_variants():
            raise EspeakError(f"{where}: unknown voice variant {variant!r}; known: {', '.join(voice_variants())}")
        if formant_scale == 1.0 and not phoneme_table:
            _check(lib.espeak_SetVoiceByName(voice.encode()), "espeak_SetVoiceByName", where)
            return
        path = _voice_file(composed_voice(voice, formant_scale, phoneme_table), where)
        _check(lib.espeak_ng_SetVoiceByFile(path.encode()), "espeak_ng_SetVoiceByFile", where)


def _voice_file(text: str, where: str) -> str:
    """Write a voice file's ``text`` once per process (named by its hash) into a temporary folder; returns its path.
    espeak-ng reads at most VOICE_PATH_MAX characters of the path, so the names are short."""
    if _Engine.voice_dir is None:
        _Engine.voice_dir = tempfile.TemporaryDirectory(prefix="espeak-")
    path = os.path.join(_Engine.voice_dir.name, hashlib.sha256(text.encode()).hexdigest()[:12])
    if len(path.encode()) > VOICE_PATH_MAX:
        raise EspeakError(f"{where}: the voice file {path} has a path longer than the {VOICE_PATH_MAX} characters "
                          "espeak-ng reads; set TMPDIR to a shorter folder (e.g. /tmp)")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def _check(status: int, call: str, where: str) -> None:
    if status != EE_OK:
        raise EspeakError(f"{where}: {call} failed with {ESPEAK_ERRORS.get(status, status)}")


def resample(wav: np.ndarray) -> np.ndarray:
    """22,050 Hz -> 16 kHz, float32: exactly ``librosa.resample`` with its default ``soxr_hq``.

    soxr is called directly because librosa's first ``resample`` call costs ~2 s of lazy imports (scipy.signal
    and more), paid again by every fresh worker process; soxr is librosa's own dependency.
    """
    import soxr

    return soxr.resample(wav, SAMPLE_RATE_ESPEAK, SAMPLE_RATE, quality="soxr_hq").astype(np.float32)
