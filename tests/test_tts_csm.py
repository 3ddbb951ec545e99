"""The csm architecture of the tts stage: label construction (amortization, -101 frames) checked against the stock
expansion, constrained decoding per codebook, the stage in one process, speaking (plain, cloning, conversation,
streaming, CLI) and the stock load of what it writes. Tiny random codecs and models, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.cli import main as cli
from audiollm.tts.codecs import load_codec
from audiollm.tts.csm_data import BACKBONE_ONLY, CsmCollator, CsmIds, expand_labels, row_sequence
from audiollm.tts.csm_generate import CsmPrompt, build_csm_prompt, first_codebook_mask, sample_frames
from audiollm.tts.csm_model import frame_embeddings, new_csm_model
from audiollm.tts.csm_training import CsmArguments, csm_loss
from audiollm.tts.data import IGNORE_INDEX
from audiollm.tts.generate import TTSModel, load_tts, speak, speak_stream
from audiollm.tts.sampling import Sampling
from audiollm.tts.tiny import tiny_codec, tiny_lm

TEXTS = ["one two three", "red green blue", "seven eight", "hello world", "good morning", "cat and dog"]


def write_rows(root: Path, rate: int = 16000) -> Path:
    """Six rows of 0.4-1.1 s of noise and one missing file."""
    rows = []
    for i, text in enumerate(TEXTS):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int((0.4 + 0.15 * i) * rate))
        sf.write(root / f"clip{i}.wav", wav.astype(np.float32), rate)
        rows.append({"audio": f"clip{i}.wav", "text": text})
    rows.append({"audio": "gone.wav", "text": "x"})
    (root / "tts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "tts.jsonl"


@pytest.fixture(scope="module")
def mimi_csm(tmp_path_factory):
    """A fresh CSM over a tiny Mimi (4 levels of 32 codes): the stock class can run this codec itself."""
    root = tmp_path_factory.mktemp("csm_mimi")
    codec = load_codec(tiny_codec("mimi", root / "codec"))
    model, tokenizer, vocab = new_csm_model(tiny_lm(root / "lm"), codec, depth_layers=1)
    return TTSModel(model.eval(), tokenizer, vocab, codec)


def test_labels_match_the_stock_expansion_of_input_values(mimi_csm):
    """Stock 2-D labels (audio_token_id, -101, -100) expanded by our collator's function from cached codes equal
    what CsmForConditionalGeneration makes of the same audio through its own codec; so do the embeddings."""
    model, ids = mimi_csm.model, CsmIds.of(mimi_csm.model.config)
    wav = torch.from_numpy(0.1 * np.random.default_rng(0).standard_normal(24000).astype(np.float32))
    with torch.no_grad():
        codes = model.codec_model.encode(wav[None, None]).audio_codes[0].T  # (N, K)
    prompt = [5, 6, 7]
    n = len(codes)
    input_ids = torch.tensor([prompt + [ids.audio_token] * n + [ids.audio_eos]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 3 : 3 + n : 2] = ids.audio_token  # every other frame trains the depth decoder
    labels[0, 4 : 3 + n : 2] = BACKBONE_ONLY
    labels[0, -1] = BACKBONE_ONLY
    stock = model._merge_input_ids_with_input_values(input_ids, wav[None, None], torch.tensor([[len(wav)]]),
                                                     labels)
    ours_codes = row_sequence("x", list(codes.T), mimi_csm.tokenizer, mimi_csm.vocab, ids)["codes"][-n - 1 :]
    padded = torch.cat([torch.full((3, ids.codebooks), ids.codebook_pad), ours_codes])[None]
    ours = expand_labels(labels, padded, ids)
    stock_labels = stock["labels"].clone()
    stock_labels[0, -1, 1:] = IGNORE_INDEX  # the EOS frame: stock labels its EOS codes on codebooks 1..K-1 too
    assert torch.equal(ours, stock_labels)
    assert torch.equal(ours[0, 4, 1:], torch.full((ids.codebooks - 1,), IGNORE_INDEX))  # -101: codebook 0 only
    with torch.no_grad():
        assert torch.allclose(frame_embeddings(model, input_ids, padded, ids), stock["inputs_embeds"])


def test_collator_draws_the_depth_fraction_and_labels_frames(mimi_csm):
    ids = CsmIds.of(mimi_csm.model.config)
    rows = [row_sequence(t, [torch.randint(0, 32, (n,)) for _ in range(4)], mimi_csm.tokenizer, mimi_csm.vocab, ids)
            for t, n in (("one two", 40), ("three", 24))]
    batch = CsmCollator(0, ids, depth_frame_fraction=1 / 16, seed=1)(rows)
    frames = batch["input_ids"] == ids.audio_token
    labels = batch["labels"]
    depth = frames & (labels[..., 1:] != IGNORE_INDEX).all(-1)
    assert int(frames.sum()) == 64 and int(depth.sum()) == 4  # 1/16 of the batch's 64 frames
    assert torch.equal(labels[frames][:, 0], batch["codes"][frames][:, 0])  # the backbone trains on every frame
    assert (labels[frames & ~depth][:, 1:] == IGNORE_INDEX).all()
    eos = batch["input_ids"] == ids.audio_eos
    assert (labels[eos][:, 0] == ids.codebook_eos).all() and (labels[eos][:, 1:] == IGNORE_INDEX).all()
    assert (labels[~frames & ~eos] == IGNORE_INDEX).all()  # text and padding
    with pytest.raises(ValueError, match="depth_frame_fraction"):
        CsmCollator(0, ids, depth_frame_fraction=0.0)(rows)
    loss, parts = csm_loss(mimi_csm.model, mimi_csm.model, batch, CsmArguments(text_loss_weight=0.5))
    assert torch.isfinite(loss) and set(parts) == {"backbone_loss", "depth_loss", "text_loss"}
    doubled, _ = csm_loss(mimi_csm.model, mimi_csm.model, batch, CsmArguments(first_codebook_weight=2.0))
    plain, _ = csm_loss(mimi_csm.model, mimi_csm.model, batch, CsmArguments())
    assert torch.allclose(doubled - plain, parts["backbone_loss"])


def test_first_codebook_mask():
    ids = CsmIds(audio_token=9, audio_eos=8, codebook_eos=32, codebook_pad=33, codebooks=4)
    start = first_codebook_mask(ids, 34, new_frames=0, prefilled=5, max_frames=10)
    assert start[:32].all() and not start[32] and not start[33]  # no end before one new frame, never PAD
    later = first_codebook_mask(ids, 34, new_frames=3, prefilled=5, max_frames=10)
    assert later[:33].all() and not later[33]
    cap = first_codebook_mask(ids, 34, new_frames=5, prefilled=5, max_frames=10)
    assert cap.nonzero().flatten().tolist() == [32]


class Biased(torch.nn.Module):
    """A head whose logits get ``bias`` (V,) added: steers sampling towards the ids the constraint must refuse."""

    def __init__(self, head, bias: torch.Tensor):
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, *args, **kwargs):
        return self.head(*args, **kwargs) + self.bias


@pytest.mark.parametrize("eos_bias", [1e4, -1e4])
def test_decoding_keeps_codes_valid_per_codebook_and_ends_at_a_frame(mimi_csm, eos_bias):
    """Whatever the logits favour (EOS at once or never; PAD / EOS on the depth codebooks), every frame is K valid
    codes; speech ends with a whole EOS frame, after at least one frame, and by the cap."""
    model, ids = mimi_csm.model, CsmIds.of(mimi_csm.model.config)
    prompt = build_csm_prompt(mimi_csm, "one two")
    prompt = CsmPrompt(prompt.input_ids, prompt.codes, prompt.prefix, max_frames=6)
    first_bias, depth_bias = torch.zeros(model.config.vocab_size), torch.zeros(model.config.vocab_size)
    first_bias[ids.codebook_eos], depth_bias[ids.codebook_eos :] = eos_bias, 1e4
    heads = model.lm_head, model.depth_decoder.codebooks_head
    model.lm_head, model.depth_decoder.codebooks_head = Biased(heads[0], first_bias), Biased(heads[1], depth_bias)
    try:
        steps = list(sample_frames(model, prompt, Sampling(temperature=1.0, seed=3), rows=2))
    finally:
        model.lm_head, model.depth_decoder.codebooks_head = heads
    frames = torch.stack(steps, dim=1)  # (rows, steps, K)
    for row in frames:
        ends = (row[:, 0] == ids.codebook_eos).nonzero().flatten()
        assert int(ends[0]) == (1 if eos_bias > 0 else 6)  # one frame at least; the cap of 6 at most
        speech, after = row[: ends[0]], row[ends[0] :]
        assert (speech < ids.codebook_eos).all() and (after == ids.codebook_eos).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The stage (architecture csm, the shipped demo recipe) for 2 steps on a tiny codec trained here."""
    root = tmp_path_factory.mktemp("csm_stage")
    codec, lm, manifest = tiny_codec("melcodec", root / "codec"), tiny_lm(root / "lm"), write_rows(root)
    cli(["train", "tts", "--config", "stages/configs/tts_csm_demo.yaml", "--model_name_or_path", str(lm),
         "--codec_name_or_path", str(codec), "--codec_codebooks", "3", "--train_files", str(manifest),
         "--eval_files", str(manifest), "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache"),
         "--max_steps", "2", "--per_device_train_batch_size", "3", "--use_cpu", "true", "--logging_steps", "1",
         "--eval_strategy", "steps", "--eval_steps", "2"])
    return root


def test_stage_writes_a_folder_stock_transformers_loads(trained):
    from transformers import CsmForConditionalGeneration

    out = trained / "out"
    model, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_codebooks == 3 and model.config.codebook_eos_token_id == 16
    assert json.loads((out / "tts_config.json").read_text())["architecture"] == "csm"
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 2 and {"backbone_loss", "depth_loss"} <= set(logged[0])
    assert any("eval_loss" in h for h in state["log_history"])


def test_speak_clone_converse_and_stream(trained):
    tts = load_tts(trained / "out")
    rate, spf = tts.codec.sample_rate, tts.codec.samples_per_frame
    sampling = Sampling(temperature=0.9, top_k=8, seed=0)
    plain = speak(tts, "one two", sampling=sampling)
    assert plain.seconds > 0 and len(plain.wav) % spf == 0 and plain.prompt_frames == 0
    clip = str(trained / "clip1.wav")
    cloned = speak(tts, "one two", prompt_audio=clip, prompt_text=TEXTS[1], sampling=sampling)
    assert cloned.prompt_frames > 0 and len(cloned.tokens) % 3 == 0
    talk = speak(tts, "seven", turns=[(TEXTS[0], str(trained / "clip0.wav")), (TEXTS[1], clip)], sampling=sampling)
    assert talk.seconds > 0
    streamed = np.concatenate(list(speak_stream(tts, "one two", sampling=sampling, hop=2)))
    assert len(streamed) == len(plain.wav)  # the same seed samples the same frames, streamed or not
    with pytest.raises(ValueError, match="needs both"):
        speak(tts, "x", prompt_audio=clip)
    assert rate == 16000


def test_speak_cli_streams_a_csm(trained, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert cli(["speak", "--model", str(trained / "out"), "--text", "hello", "--out", str(out), "--stream",
                "--turn", TEXTS[0], str(trained / "clip0.wav")]) == 0
    assert "time to first audio" in capsys.readouterr().out and sf.info(str(out)).frames > 0


def test_flat_model_refuses_conversation_turns(tmp_path):
    from audiollm.tts.training import TTSModelArguments, load_tts_model

    codec = tiny_codec("melcodec", tmp_path / "codec")
    model, tokenizer, vocab = load_tts_model(TTSModelArguments(str(tiny_lm(tmp_path / "lm")), str(codec),
                                                               layout="rvq"))
    with pytest.raises(ValueError, match="needs a csm model"):
        speak(TTSModel(model, tokenizer, vocab, load_codec(codec)), "x", turns=[("y", "y.wav")])


def test_csm_refuses_a_single_level_codec(tmp_path):
    codec = load_codec(tiny_codec("xcodec2", tmp_path / "codec"))
    with pytest.raises(ValueError, match="2\\+ RVQ levels"):
        new_csm_model(tiny_lm(tmp_path / "lm"), codec, depth_layers=1)


def test_a_dac_codec_goes_inside_the_checkpoint(tmp_path):
    """A transformers codec (DAC here) is the checkpoint's own codec_model, weights and all, so stock generation
    can decode; the codec trained here gets the placeholder (see audiollm/tts/csm_model.py)."""
    codec = load_codec(tiny_codec("dac", tmp_path / "codec", sample_rate=16000))
    model, _, vocab = new_csm_model(tiny_lm(tmp_path / "lm"), codec, depth_layers=1)
    assert model.config.codec_config.model_type == "dac" and vocab.codebook_size == 64
    wav = 0.1 * np.random.default_rng(0).standard_normal(3200).astype(np.float32)
    with torch.no_grad():
        inside = model.codec_model.encode(torch.from_numpy(wav)[None, None]).audio_codes[0]
    assert torch.equal(inside, torch.stack(codec.encode(wav)))


def test_stage_refuses_words_interleaving_for_csm(tmp_path):
    lm, codec = tiny_lm(tmp_path / "lm"), tiny_codec("melcodec", tmp_path / "codec")
    with pytest.raises(ValueError, match="interleave 'words'"):
        cli(["train", "tts", "--config", "stages/configs/tts_csm_demo.yaml", "--model_name_or_path", str(lm),
             "--codec_name_or_path", str(codec), "--interleave", "words", "--train_files", "x.jsonl",
             "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
