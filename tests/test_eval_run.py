"""``audiollm eval`` end to end on tiny models: every task kind, rescoring, a judge LM, a stock Qwen2-Audio folder,
batching invariance, and Whisper intelligibility scoring of speech with tiny random checkpoints."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.build import build_tiny
from audiollm.chat import CHAT_TEMPLATE, IM_END
from audiollm.data import audio_seconds
from audiollm.tiny import tiny_text_config, tiny_tokenizer
from eval import metrics
from eval.cli import add_eval_parser
from eval.generate import (
    GenerationSettings,
    batch_order,
    generate_answers,
    item_length,
    load_model,
    preference_logps,
)
from eval.pipeline import evaluate, load_tasks
from eval.tasks import build_messages
from eval.speech import intelligibility, load_transcriber, transcript_wer
from tests.conftest import write_stock_qwen2_audio

# shared/ sits beside the checkout
MMAU_JSON = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mmau-test-mini.json"


def clip(seconds: float, seed: int) -> np.ndarray:
    """A voiced 16 kHz tone with a syllable-rate envelope, (n,) float32."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120 + 40 * seed
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
    return (0.2 * wave).astype(np.float32)


def write_wav(path: Path, seconds: float, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, clip(seconds, seed), SAMPLE_RATE)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def user_turn(text: str, audio: bool = True) -> dict:
    return {"role": "user", "content": ("<audio>" if audio else "") + text}


def write_manifests(root: Path) -> dict:
    """Our own JSONL rows: pretrain (asr + a short-answer task), chat (one multi-turn), translation, preference."""
    pretrain = write_jsonl(root / "pretrain.jsonl", [
        {"audio": "c0.wav", "task": "asr", "text": "hello world"},
        {"audio": "c1.wav", "task": "asr", "text": "good morning"},
        {"audio": "c2.wav", "task": "sex", "text": "male"},
    ])
    chat = write_jsonl(root / "chat.jsonl", [
        {"audios": ["c0.wav"], "messages": [user_turn("What is three plus four?"),
                                            {"role": "assistant", "content": "seven"}]},
        {"audios": ["c1.wav", "c2.wav"], "messages": [
            user_turn("Count up."), {"role": "assistant", "content": "one two"},
            user_turn("And this?"), {"role": "assistant", "content": "three"}]},
    ])
    st = write_jsonl(root / "st.jsonl", [
        {"audios": ["c3.wav"], "messages": [user_turn("Translate into German."),
                                            {"role": "assistant", "content": "Guten Morgen"}]},
        {"audios": ["c0.wav"], "messages": [user_turn("Translate into German."),
                                            {"role": "assistant", "content": "Hallo Welt"}]},
    ])
    prefs = write_jsonl(root / "prefs.jsonl", [
        {"audios": ["c0.wav"], "messages": [user_turn("What is this?")], "chosen": "a dog", "rejected": "a cat"},
        {"audios": ["c1.wav"], "messages": [user_turn("Who speaks?")], "chosen": "a man", "rejected": "a woman"},
        {"audios": [], "messages": [user_turn("Say hi.", audio=False)], "chosen": "hi", "rejected": "hello there"},
    ])
    return {"pre": pretrain, "chat": chat, "st": f"translation@de:{st}", "prefs": prefs}


def write_benchmarks(root: Path) -> dict:
    """Three real MMAU items (audio under their own root) and AIR-Bench foundation and chat meta files."""
    mmau = json.loads(MMAU_JSON.read_text())[:3]
    for i, item in enumerate(mmau):
        item["audio_id"] = f"./test-mini-audios/{item['id']}.wav"
        write_wav(root / "mmau_audio" / "test-mini-audios" / f"{item['id']}.wav", 0.5, i)
    (root / "mmau.json").write_text(json.dumps(mmau))
    foundation = [
        {"path": "x1.wav", "question": "What animal?", "choice_a": "cat", "choice_b": "dog", "choice_c": "cow",
         "choice_d": "bird", "answer_gt": "dog", "task_name": "Sound_AQA", "dataset_name": "clotho", "uniq_id": 1},
        {"path": "x2.wav", "question": "Male or female?", "choice_a": "male", "choice_b": "female",
         "answer_gt": "female", "task_name": "Speaker_Gender_Recognition", "dataset_name": "cv", "uniq_id": 2},
    ]
    chat_meta = [
        {"meta_info": "A dog barks.", "question": "What happens?", "answer_gt": "A dog barks.", "path": "y1.wav",
         "task_name": "sound_QA", "dataset_name": "clotho", "uniq_id": 0},
        {"meta_info": "A man says hello.", "question": "Who talks?", "answer_gt": "A man.", "path": "y2.wav",
         "task_name": "speech_QA", "dataset_name": "cv", "uniq_id": 1},
    ]
    for row, seed in zip(foundation + chat_meta, range(4)):
        write_wav(root / "air" / f"{row['task_name']}_{row['dataset_name']}" / row["path"], 0.5, seed)
    (root / "air" / "Foundation_meta.json").write_text(json.dumps(foundation))
    (root / "air" / "Chat_meta.json").write_text(json.dumps(chat_meta))
    return {"mmau": str(root / "mmau.json"), "air": str(root / "air" / "Foundation_meta.json"),
            "airchat": str(root / "air" / "Chat_meta.json")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One source of every kind, with wav clips, in the formats users have on disk."""
    root = tmp_path_factory.mktemp("bench")
    for i in range(4):
        write_wav(root / f"c{i}.wav", 0.4 + 0.2 * i, i)
    tasks = write_manifests(root) | write_benchmarks(root)
    return {"root": root, "tasks": tasks, "audio_roots": [f"mmau={root / 'mmau_audio'}"]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-stack"
    build_tiny(folder, projector="stack", stack=4, seed=0)  # a stacking projector: the collator must follow it
    return folder


def cli(argv: list[str]) -> int:
    """Run ``audiollm eval ARGV`` as the lead's parser will (a subcommand added by ``add_eval_parser``)."""
    parser = argparse.ArgumentParser(prog="audiollm")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


@pytest.fixture(scope="module")
def run(bench, tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    argv = ["--model", str(tiny_folder), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6"]
    for name, source in bench["tasks"].items():
        argv += ["--task", f"{name}={source}"]
    for root in bench["audio_roots"]:
        argv += ["--audio-root", root]
    assert cli(argv) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return out, json.loads((out / "results.json").read_text()), records


EXPECTED = {  # task -> (kind, metric, items)
    "pre/asr": ("asr", "wer", 2), "pre/short": ("short", "accuracy", 1), "chat": ("short", "accuracy", 2),
    "st": ("translation", "bleu", 2), "prefs": ("preference", "pref_accuracy", 3), "mmau": ("mcq", "accuracy", 3),
    "air": ("mcq_letter", "accuracy", 2), "airchat": ("open", "judge_score", 2),
}


def test_results_cover_every_kind(run):
    out, results, records = run
    assert results["model"] == "tiny-stack" and results["judge"] is None
    assert list(results["tasks"]) == list(EXPECTED)
    for name, (kind, metric, n) in EXPECTED.items():
        entry = results["tasks"][name]
        assert (entry["kind"], entry["metric"], entry["model"]) == (kind, metric, "tiny-stack"), name
        if kind == "open":
            assert entry["unscored"] and entry["value"] is None and entry["ci95"] is None and "judge" in entry["reason"]
            continue
        assert not entry["unscored"] and entry["n"] == n, name
        low, high = entry["ci95"]
        assert low <= entry["value"] <= high, name
    assert results["tasks"]["mmau"]["groups"] == {"sound": {"value": results["tasks"]["mmau"]["value"], "n": 3}}
    assert results["tasks"]["st"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert results["tasks"]["pre/asr"]["normalizer"] == "whisper EnglishTextNormalizer"


def test_predictions_rows(run):
    out, results, records = run
    assert len(records) == sum(n for _, _, n in EXPECTED.values())
    for record in records:
        assert {"task", "id", "prompt", "reference", "prediction", "score"} <= record.keys()
        assert isinstance(record["prediction"], str)
        assert record["generation"] == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0,
                                        "num_beams": 1}
    assert all(entry["generation"] == records[0]["generation"] for entry in results["tasks"].values())
    open_rows = [r for r in records if r["kind"] == "open"]
    assert all(r["score"] is None for r in open_rows) and open_rows[0]["context"] == "A dog barks."
    multi_turn = next(r for r in records if r["task"] == "chat" and r["reference"] == "three")
    assert multi_turn["prompt"].startswith("user: <audio>Count up.\nassistant: one two\nuser: <audio>And this?")
    letters = [r["prompt"] for r in records if r["task"] == "air"]
    assert letters[1].endswith("Male or female?\nA. male\nB. female")


def test_values_recomputed_from_the_predictions(run):
    out, results, records = run
    for name, entry in results["tasks"].items():  # speed from each record's share of its task's generation time
        seconds = sum(r["generate_seconds"] for r in records if r["task"] == name)
        assert entry["items_per_s"] == pytest.approx(entry["items"] / seconds) and seconds > 0, name
    air = [r for r in records if r["task"] == "air"]
    parsed = [r for r in air if metrics.airbench_letter(r["prediction"]) is not None]
    right = sum(metrics.airbench_letter(r["prediction"]) == r["reference"] for r in air)
    assert results["tasks"]["air"]["value"] == (right / len(parsed) if parsed else 0.0)
    assert results["tasks"]["air"]["accuracy_unparsed_wrong"] == right / len(air)
    asr = [r for r in records if r["task"] == "pre/asr"]
    counts = np.sum([metrics.asr_counts(r["reference"], r["prediction"]) for r in asr], axis=0)
    assert results["tasks"]["pre/asr"]["value"] == pytest.approx(counts[0] / counts[1])
    mmau = [r for r in records if r["task"] == "mmau"]
    right = np.mean([metrics.mmau_match(r["prediction"], r["reference"], r["choices"]) for r in mmau])
    assert results["tasks"]["mmau"]["value"] == pytest.approx(right)
    prefs = [r for r in records if r["task"] == "prefs"]
    assert all(r["chosen_logp"] < 0 and r["rejected_logp"] < 0 for r in prefs)
    wins = np.mean([r["chosen_logp"] > r["rejected_logp"] for r in prefs])
    assert results["tasks"]["prefs"]["value"] == pytest.approx(wins)


def test_report(run):
    out, results, records = run
    report = (out / "report.md").read_text()
    assert "| task | kind | metric | value | 95% CI | n | items/s |" in report
    air = results["tasks"]["air"]
    assert f"with {air['unparsed']} unparsed as wrong)" in report  # the official value first, ours beside it
    for name in EXPECTED:
        assert f"| {name} |" in report
    assert "unscored: open-ended answers need a judge model" in report
    assert "## pre/asr: worst errors" in report  # a random tiny model gets every transcript wrong


def test_rescoring_saved_predictions_reproduces_results(run, tmp_path):
    out, results, records = run
    assert cli(["--score-only", str(out / "predictions.jsonl"), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()


def test_python_m_eval_entry_point(run, tmp_path):
    from eval.__main__ import main

    out, results, records = run
    assert main(["--score-only", str(out / "predictions.jsonl"), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_cli_errors(run, tmp_path, capsys):
    out, _, _ = run
    with pytest.raises(SystemExit) as exit_info:
        cli(["--score-only", str(out / "predictions.jsonl"), "--model", "x", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model", str(tmp_path), "--task", f"m={tmp_path / 'missing.json'}", "--out", str(tmp_path)])
    assert exit_info.value.code == 1 and "missing.json: benchmark file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model", str(tmp_path), "--task", "m=x.json", "--num-beams", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--num-beams" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- judge


def rigged_judge(folder: Path) -> Path:
    """A tiny Qwen2 LM whose greedy reply to any chat prompt is "7 8".

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding and the next
    token depends on the current one only; the LM head maps "\\n" (end of the chat prompt) -> "7" -> " " -> "8" ->
    <|im_end|>.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in ("\n", "7", " ", "8")]
    assert all(len(i) == 1 for i in ids)
    chain = [i[0] for i in ids] + [tokenizer.convert_tokens_to_ids(IM_END)]
    config = tiny_text_config(len(tokenizer))
    config.pop("model_type")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config, eos_token_id=chain[-1], pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.model.embed_tokens.weight
        for current, following in zip(chain, chain[1:]):
            model.lm_head.weight[following] = 10 * embed[current] / embed[current].norm()
    model.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_judge_scores_open_tasks_on_rescoring(run, tmp_path):
    out, results, records = run
    judge = rigged_judge(tmp_path / "judge-lm")
    assert cli(["--score-only", str(out / "predictions.jsonl"), "--judge", str(judge), "--out",
                str(tmp_path / "judged")]) == 0
    judged = json.loads((tmp_path / "judged" / "results.json").read_text())
    entry = judged["tasks"]["airchat"]
    # "7 8" in both orders: the model gets 8 (as Assistant 2) and 7 (as Assistant 1): 7.5, and so does the reference
    assert (entry["value"], entry["n"], entry["judge"], entry["unscored"]) == (7.5, 2, "judge-lm", False)
    assert entry["reference_score"] == 7.5 and entry["ci95"] == [7.5, 7.5]
    assert judged["judge"] == "judge-lm"
    for name in EXPECTED:
        if name != "airchat":
            assert judged["tasks"][name] == results["tasks"][name]
    rows = [json.loads(line) for line in (tmp_path / "judged" / "predictions.jsonl").read_text().splitlines()]
    assert [r["judge"]["outputs"] for r in rows if r["kind"] == "open"] == [["7 8", "7 8"]] * 2


# ------------------------------------------------------------------------------------------------------ batching


def test_batches_by_length_longest_first_ties_in_file_order(bench):
    items = load_tasks({"pre": bench["tasks"]["pre"], "chat": bench["tasks"]["chat"]})
    prompts = items["pre/asr"] + items["chat"]  # clips 0.4 s, 0.6 s; then 0.4 s, 0.6 + 0.8 s with two turns
    lengths = [item_length(item) for item in prompts]
    text = len(build_messages(prompts[1])[0]["content"]) // 4
    assert lengths[1] == 15 + text + 11 + 5 + 6  # 0.6 s: 15 audio tokens; system, one turn and one clip around
    assert lengths[3] > lengths[1] > lengths[0] > lengths[2]  # 0 and 2: same clip, the ASR prompt is longer
    assert batch_order(prompts, 3) == [[3, 1, 0], [2]]
    assert batch_order(prompts, 3, by_length=False) == [[0, 1, 2], [3]]
    same = [prompts[0]] * 3
    assert batch_order(same, 2) == [[0, 1], [2]]


def test_audio_seconds_of_every_entry_form(bench, tmp_path):
    path = bench["root"] / "c1.wav"  # 0.6 s
    embedded = {"bytes": path.read_bytes(), "path": None}
    entries = [str(path), {"path": str(path)}, embedded, {"array": np.zeros(14_400), "sampling_rate": 24_000},
               clip(0.6, 0)]
    assert [audio_seconds(e) for e in entries] == pytest.approx([0.6] * 5)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    assert audio_seconds(str(tmp_path / "bad.wav")) == audio_seconds(str(tmp_path / "missing.wav")) == 0.0


def test_batched_generation_and_preferences_match_one_by_one(bench, tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    items = load_tasks({"chat": bench["tasks"]["chat"], "pre": bench["tasks"]["pre"]})
    prompts = items["pre/asr"][:1] + items["chat"]  # three prompts of different lengths: left padding matters
    settings = GenerationSettings(max_new_tokens=4)
    together = generate_answers(model, tokenizer, prompts, settings, batch_size=2)  # batches [2, 1], [0]
    assert together == generate_answers(model, tokenizer, prompts, settings, batch_size=1)  # back in item order
    assert together == generate_answers(model, tokenizer, prompts, settings, 2, by_length=False)  # [0, 1], [2]
    assert len(set(together)) > 1  # distinct answers, so a misplaced one would show
    sampled = GenerationSettings(max_new_tokens=4, temperature=1.5, top_p=0.9, seed=3)
    assert generate_answers(model, tokenizer, prompts, sampled, 3) == generate_answers(model, tokenizer, prompts,
                                                                                        sampled, 3)  # seeded
    beams = GenerationSettings(max_new_tokens=4, num_beams=3)  # each prompt's audio features follow its 3 beams
    assert generate_answers(model, tokenizer, prompts, beams, 2) == generate_answers(model, tokenizer, prompts,
                                                                                      beams, 1)
    prefs = load_tasks({"p": bench["tasks"]["prefs"]})["p"]
    together = np.array(preference_logps(model, tokenizer, prefs, 2))
    alone = np.array(preference_logps(model, tokenizer, prefs, 1))
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    np.testing.assert_allclose(np.array(preference_logps(model, tokenizer, prefs, 2, by_length=False)), alone,
                               rtol=1e-4)


# --------------------------------------------------------------------------------------------- stock Qwen2-Audio


def test_stock_qwen2_audio_folder(bench, tmp_path):
    folder = write_stock_qwen2_audio(tmp_path / "Qwen2-Audio-tiny")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_audio"
    tasks = {"mmau": bench["tasks"]["mmau"], "pre": bench["tasks"]["pre"]}
    audio_root = {"mmau": str(bench["root"] / "mmau_audio")}
    results = evaluate(folder, tasks, tmp_path / "out", batch_size=2, max_new_tokens=4, audio_root=audio_root,
                       num_beams=2)  # stock generate() expands the audio features for its beams too
    assert results["model"] == "Qwen2-Audio-tiny"
    assert {name: entry["n"] for name, entry in results["tasks"].items()} == {"mmau": 3, "pre/asr": 2,
                                                                               "pre/short": 1}
    rows = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6 and all(json.loads(r)["model"] == "Qwen2-Audio-tiny" for r in rows)
    assert all(json.loads(r)["generation"]["num_beams"] == 2 for r in rows)


# ----------------------------------------------------------------------------------------------- speech output


def test_transcript_wer_uses_whisper_normaliser():
    result = transcript_wer(["Hello, World!", "Mr. Smith has twenty-one dogs."],
                            ["hello world", "mister smith has 21 dogs"])
    assert (result["wer"], result["errors"], result["words"], result["n"]) == (0.0, 0, 7, 2)
    assert transcript_wer(["你好世界"], ["你好事界"], "zh")["wer"] == 0.25
    lists = transcript_wer(["six seven eight nine"], ["six seven eight five"], normalizer="words")
    assert (lists["errors"], lists["words"]) == (1, 4)  # "6789" against "6785" is (1, 1) by language


def tiny_openai_whisper(path: Path) -> Path:
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=16, n_text_state=16, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    torch.save({"dims": dims.__dict__, "model_state_dict": Whisper(dims).state_dict()}, path)
    return path


def tiny_hf_whisper(folder: Path) -> Path:
    """A 1-layer HF Whisper with a byte-level tokenizer written here (no download) and Whisper's special tokens."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    end = ids["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32, max_target_positions=32,
                           decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=end, pad_token_id=end)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=end, pad_token_id=end, max_length=12,
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]}, no_timestamps_token_id=ids["<|notimestamps|>"],
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
    )
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make", [tiny_openai_whisper, tiny_hf_whisper], ids=["openai-pt", "hf-folder"])
def test_intelligibility_with_tiny_whisper(make, tmp_path):
    checkpoint = make(tmp_path / ("tiny.pt" if make is tiny_openai_whisper else "tiny-whisper"))
    transcriber = load_transcriber(str(checkpoint))
    texts = ["hello world", "good morning to you"]
    result = intelligibility(transcriber, [clip(0.5, 0), clip(0.8, 1)], texts)
    assert result["transcriber"] == checkpoint.name and result["n"] == 2
    transcripts = [item["transcript"] for item in result["items"]]
    assert all(isinstance(t, str) for t in transcripts)
    assert result["wer"] == transcript_wer(texts, transcripts)["wer"]  # garbage transcripts, same scoring path
    assert result["words"] == 6
