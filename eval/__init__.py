"""The evaluation harness: benchmark files -> model answers -> scores -> results.json and report.md.

Command line (``audiollm eval`` or ``python -m eval``)::

    audiollm eval --model DIR --task NAME=SOURCE [--task NAME=SOURCE ...] --out DIR
        [--batch-size 8] [--max-new-tokens 32] [--temperature 0] [--top-p 1.0] [--seed 0] [--limit N]
        [--audio-root [NAME=]DIR] [--judge PATH [--trust-remote-code]] [--bootstrap 1000] [--device] [--dtype]
    audiollm eval --score-only DIR/predictions.jsonl --out DIR2 [--judge PATH]

SOURCE is ``[norm=NORM:][KIND[@LANG]:][FORMAT:]PATH``; each prefix is optional and recognised by its name:

    NORM    english | basic | words: ASR's text normaliser (default: english for English, else basic); words is
            the English one word by word, for word lists ("seven eleven" stays two words, not the number 711)
    KIND    asr | mcq | mcq_letter | short | translation | open | preference   (default: from FORMAT or the rows)
    LANG    ISO code of the references: asr's spoken language, translation's target (default: the row's "lang",
            else en). zh/ja ASR is scored by characters; BLEU picks its tokenizer from it.
    FORMAT  manifest | mmau | airbench_foundation | airbench_chat | hf | librispeech  (default: detected)

    mmau=/data/mmau/mmau-test-mini.json          MMAU JSON, choices scored by MMAU's token rule
    air=airbench_foundation:Foundation_meta.json  AIR-Bench foundation, scored by the response's letter
    ls=/data/LibriSpeech/test-clean              LibriSpeech folder, WER
    aishell=asr@zh:hf:/data/aishell_test         save_to_disk folder, CER
    st=translation@de:manifest:covost_de.jsonl   our manifest rows, BLEU against German references
    dpo=prefs.jsonl                              preference rows, share where chosen beats rejected
    lists=norm=words:asr:word_lists.jsonl        word lists, WER per spoken word

Outputs in --out: ``predictions.jsonl`` (one row per item: id, prompt, reference, prediction, score, and what
rescoring needs), ``results.json`` (per task: metric, value, n, 95% bootstrap CI, model, judge; open-ended tasks
without a judge are "unscored" with a reason, never given a number) and ``report.md`` (results table and the worst
errors per task).

Python: ``eval.evaluate(model_dir, {"mmau": "mmau-test-mini.json"}, out_dir, batch_size=8, max_new_tokens=32)``
returns the results dict; ``eval.rescore(predictions, out_dir, judge=None)`` rescores saved predictions.

Modules: ``metrics`` (pure scoring rules and the bootstrap), ``tasks`` (kinds: prompt and score per kind),
``loaders`` (benchmark formats), ``generate`` (batched generation, preference log-probs), ``judge`` (LLM judge),
``report`` (results.json, report.md), ``pipeline`` (the two steps), ``speech`` (listeners: Whisper or an audio LLM
transcribing speech, WER of generated speech), ``tts_eval`` (``audiollm eval-tts``: a TTS's round-trip WER, best of
N, codec resynthesis ceiling, real-time factor, time to first audio).
"""


def __getattr__(name: str):
    # evaluate/rescore import torch and transformers; ``import eval.metrics`` alone stays light.
    if name in ("evaluate", "rescore"):
        import importlib

        return getattr(importlib.import_module("eval.pipeline"), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
