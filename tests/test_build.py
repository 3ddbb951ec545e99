"""Building model folders: HF / OpenAI Whisper encoders + tiny Qwen2 / Qwen3 LLMs, Qwen2-Audio re-save, --tiny.

Every source checkpoint is made here from a tiny config; every folder written is loaded back, by our class and,
for the linear projector, by stock transformers.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from whisper.model import ModelDimensions, Whisper

import audiollm.tiny
from audiollm.build import (
    BuildError,
    add_audio_tokens,
    build_tiny,
    encoder_from_hf_whisper,
    encoder_from_openai_pt,
)
from audiollm.chat import AUDIO_SPECIAL_TOKENS, AUDIO_TOKEN, CHAT_TEMPLATE, ENDOFTEXT, IM_END
from audiollm.cli import main
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer

N_MELS, D_MODEL, HEADS, LAYERS = 128, 64, 4, 2


def _perturb(module: nn.Module, seed: int) -> None:
    """Add noise to every weight, LayerNorms and biases included: with their init (ones, zeros) a swapped
    layer-norm or bias mapping would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


def _mel(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, N_MELS, 3000, generator=torch.Generator().manual_seed(seed))  # one 30 s chunk


def _tokenizer_without_audio():
    """The tiny tokenizer as a text-only Qwen LLM ships it: no audio tokens, so init has to add them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audiollm.tiny, "AUDIO_SPECIAL_TOKENS", ())
        tokenizer = tiny_tokenizer()
    assert not set(AUDIO_SPECIAL_TOKENS) & set(tokenizer.get_vocab())
    return tokenizer


def _tiny_llm(vocab_rows: int, llm_type: str = "qwen2", tie: bool = False):
    config = dict(tiny_text_config(vocab_rows, llm_type, tie))
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def _llm_folder(path, llm_type: str, tie: bool, spare_rows: int):
    tokenizer = _tokenizer_without_audio()
    llm = _tiny_llm(len(tokenizer) + spare_rows, llm_type, tie)
    llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, llm, tokenizer


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    config = WhisperConfig(
        num_mel_bins=N_MELS,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=HEADS,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=32,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config).eval()
    _perturb(model, seed=1)
    path = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def openai_whisper(tmp_path_factory):
    dims = ModelDimensions(
        n_mels=N_MELS,
        n_audio_ctx=1500,
        n_audio_state=D_MODEL,
        n_audio_head=HEADS,
        n_audio_layer=LAYERS,
        n_vocab=100,
        n_text_ctx=16,
        n_text_state=D_MODEL,
        n_text_head=HEADS,
        n_text_layer=1,
    )
    torch.manual_seed(2)
    model = Whisper(dims).eval()
    _perturb(model, seed=2)
    path = tmp_path_factory.mktemp("openai") / "tiny.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path, model, dims


def _tower_without_pool(out) -> nn.Module:
    """The saved audio tower with AvgPool(2) removed: then it must equal a plain Whisper encoder (1500 frames)."""
    model = AudioLLMForConditionalGeneration.from_pretrained(out).eval()
    model.audio_tower.avg_pooler = nn.Identity()
    return model


def _check_llm_weights(model, source_llm, rows_before: int) -> None:
    """Every LLM tensor equals the source; grown embedding matrices keep the source rows."""
    saved = model.language_model.state_dict()
    for name, tensor in source_llm.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:  # (rows, hidden): the first rows_before are the source's
            assert tensor.shape[0] == rows_before
            saved_tensor = saved[name][:rows_before]
        else:
            saved_tensor = saved[name]
        assert torch.equal(saved_tensor, tensor), name


@pytest.mark.parametrize(
    "llm_type, tie, spare_rows", [("qwen2", False, 0), ("qwen3", True, 64)], ids=["qwen2-untied", "qwen3-tied"]
)
def test_init_from_hf_whisper(tmp_path, hf_whisper, llm_type, tie, spare_rows):
    whisper_dir, whisper_model = hf_whisper
    llm_dir, llm, text_tokenizer = _llm_folder(tmp_path / "llm", llm_type, tie, spare_rows)
    out = tmp_path / "out"
    argv = ["init", "--encoder", str(whisper_dir), "--llm", str(llm_dir), "--out", str(out), "--dtype", "fp32"]
    assert main(argv) == 0

    model = _tower_without_pool(out)
    source = load_file(whisper_dir / "model.safetensors")
    tower = model.audio_tower.state_dict()
    assert set(tower) == {name[len("model.encoder.") :] for name in source if name.startswith("model.encoder.")}
    for name, tensor in tower.items():
        assert torch.equal(tensor, source[f"model.encoder.{name}"]), name
    mel = _mel()
    with torch.no_grad():
        ours, _ = model.audio_tower(mel)
        reference = whisper_model.model.encoder(mel).last_hidden_state  # (1, 1500, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)

    # 3 audio tokens added: without spare rows the matrix grows to a multiple of 64, with spare rows it stays.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(text_tokenizer) + 3
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    assert rows == (len(text_tokenizer) + spare_rows if spare_rows else -(-len(tokenizer) // 64) * 64)
    assert model.config.text_config.vocab_size == rows
    assert model.config.audio_token_id == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == len(text_tokenizer) + 1
    _check_llm_weights(model, llm, len(text_tokenizer) + spare_rows)
    head, embed = model.language_model.lm_head.weight, model.language_model.get_input_embeddings().weight
    assert (head is embed) == tie


def test_init_from_openai_pt(tmp_path, openai_whisper):
    pt_file, whisper_model, _ = openai_whisper
    llm_dir, llm, text_tokenizer = _llm_folder(tmp_path / "llm", "qwen2", tie=False, spare_rows=64)
    out = tmp_path / "out"
    argv = ["init", "--encoder", str(pt_file), "--llm", str(llm_dir), "--out", str(out)]
    assert main([*argv, "--projector", "stack", "--stack", "2", "--dtype", "fp32"]) == 0

    model = _tower_without_pool(out)
    assert model.config.projector_type == "stack" and model.config.projector_stack == 2
    torch.testing.assert_close(
        model.audio_tower.embed_positions.weight, whisper_model.encoder.positional_embedding, rtol=0, atol=0
    )
    mel = _mel(1)
    with torch.no_grad():
        ours, _ = model.audio_tower(mel)
        reference = whisper_model.encoder(mel)  # OpenAI scales q and k by d^-1/4 each: rounding differs slightly
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    _check_llm_weights(model, llm, len(text_tokenizer) + 64)

    # A non-linear projector is not Qwen2-Audio: stock Auto classes refuse it instead of loading a random one.
    with pytest.raises(ValueError, match="audiollm"):
        AutoConfig.from_pretrained(out)
    with pytest.raises(ValueError, match="audiollm"):
        AutoModel.from_pretrained(out)


def test_default_dtype_is_bf16(tmp_path, openai_whisper):
    pt_file, _, _ = openai_whisper
    llm_dir, _, _ = _llm_folder(tmp_path / "llm", "qwen2", tie=False, spare_rows=64)
    assert main(["init", "--encoder", str(pt_file), "--llm", str(llm_dir), "--out", str(tmp_path / "out")]) == 0
    dtypes = {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()}
    assert dtypes == {torch.bfloat16}  # the OpenAI encoder arrived in fp32 and was cast with the LLM
    assert AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def _processor_inputs(processor, seconds: float = 1.0):
    """A 1 s clip through the stock processor: 3000 padded frames, 25 <|AUDIO|> tokens in the prompt."""
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what is this sound?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    wav = np.sin(np.arange(int(16000 * seconds)) * 0.05).astype(np.float32)
    return processor(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")


def test_linear_folder_is_stock_qwen2_audio(tmp_path, hf_whisper):
    whisper_dir, _ = hf_whisper
    llm_dir, _, _ = _llm_folder(tmp_path / "llm", "qwen2", tie=True, spare_rows=64)
    out = tmp_path / "out"
    argv = ["init", "--encoder", str(whisper_dir), "--llm", str(llm_dir), "--out", str(out), "--dtype", "fp32"]
    assert main(argv) == 0

    stock = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    ours = AudioLLMForConditionalGeneration.from_pretrained(out).eval()
    # Stock Qwen2-Audio never ties lm_head: the tied head was written out and must equal the embeddings.
    torch.testing.assert_close(stock.lm_head.weight, stock.get_input_embeddings().weight, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, Qwen2AudioProcessor)
    assert processor.chat_template == CHAT_TEMPLATE and processor.tokenizer.chat_template == CHAT_TEMPLATE
    assert set(AUDIO_SPECIAL_TOKENS) <= set(processor.tokenizer.get_vocab())
    assert processor.feature_extractor.feature_size == N_MELS
    assert processor.tokenizer.pad_token == ENDOFTEXT

    inputs = _processor_inputs(processor)
    assert int((inputs["input_ids"] == stock.config.audio_token_id).sum()) == 25
    with torch.no_grad():
        expected = stock(**inputs).logits
        got = ours(**{k: v for k, v in inputs.items() if k != "num_audio_tokens"}).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    generation = GenerationConfig.from_pretrained(out)
    vocab = processor.tokenizer.get_vocab()
    assert generation.eos_token_id == [vocab[IM_END], vocab[ENDOFTEXT]]
    assert generation.pad_token_id == vocab[ENDOFTEXT]


def test_from_qwen2_audio(tmp_path):
    tokenizer = tiny_tokenizer()
    config = Qwen2AudioConfig(
        audio_config=tiny_audio_config(),
        text_config=tiny_text_config(len(tokenizer)),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    torch.manual_seed(4)
    source = Qwen2AudioForConditionalGeneration(config).eval()
    _perturb(source, seed=4)
    source_dir, out = tmp_path / "qwen2_audio", tmp_path / "out"
    source.save_pretrained(source_dir)
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=N_MELS), tokenizer)
    processor.save_pretrained(source_dir)

    assert main(["init", "--from-qwen2-audio", str(source_dir), "--out", str(out)]) == 0
    inputs = _processor_inputs(AutoProcessor.from_pretrained(out))
    inputs.pop("num_audio_tokens", None)
    with torch.no_grad():
        expected = source(**inputs).logits
        ours = AudioLLMForConditionalGeneration.from_pretrained(out).eval()(**inputs).logits
        stock = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()(**inputs).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stock, expected, rtol=0, atol=0)

    llm_dir = _llm_folder(tmp_path / "llm", "qwen2", tie=False, spare_rows=0)[0]
    with pytest.raises(SystemExit) as exit_info:  # a plain LLM folder is not a Qwen2-Audio folder
        main(["init", "--from-qwen2-audio", str(llm_dir), "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 1


def test_tiny_is_deterministic_per_seed(tmp_path):
    first = build_tiny(tmp_path / "a", seed=7).state_dict()
    again = build_tiny(tmp_path / "b", seed=7).state_dict()
    other = build_tiny(tmp_path / "c", seed=8).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["multi_modal_projector.linear.weight"], other["multi_modal_projector.linear.weight"])
    saved = load_file(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(saved[name], first[name]) for name in saved)


def test_tiny_cli_qwen3_tied_stack(tmp_path):
    out = tmp_path / "tiny"
    argv = ["init", "--tiny", "--out", str(out), "--llm-type", "qwen3", "--tie", "--projector", "stack", "--stack", "2"]
    assert main(argv) == 0
    model = AudioLLMForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.model_type == "qwen3" and model.config.projector_stack == 2
    assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="audiollm"):  # not a stock model_type: stock transformers refuses it
        AutoConfig.from_pretrained(out)


def test_add_audio_tokens_resizes_only_when_needed():
    tokenizer = _tokenizer_without_audio()
    full = _tiny_llm(len(tokenizer))
    token_id = add_audio_tokens(tokenizer, full)
    assert token_id == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == len(tokenizer) - 2
    assert full.get_input_embeddings().weight.shape[0] == -(-len(tokenizer) // 64) * 64

    tokenizer = _tokenizer_without_audio()
    spare = _tiny_llm(len(tokenizer) + 10)
    before = spare.get_input_embeddings().weight.clone()
    add_audio_tokens(tokenizer, spare)
    assert torch.equal(spare.get_input_embeddings().weight, before)  # 3 new ids fit in the 10 spare rows

    tokenizer = tiny_tokenizer()  # already has them: nothing added, nothing resized
    size, llm = len(tokenizer), _tiny_llm(len(tiny_tokenizer()))
    assert add_audio_tokens(tokenizer, llm) == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert len(tokenizer) == size and llm.get_input_embeddings().weight.shape[0] == size


def test_whisper_model_folder_and_bin_weights_map_too(tmp_path, hf_whisper):
    whisper_dir, whisper_model = hf_whisper
    whisper_model.model.save_pretrained(tmp_path / "whisper_model")  # WhisperModel: names start with "encoder."
    bin_dir = tmp_path / "bin"  # an older folder with pytorch_model.bin, read weights-only
    whisper_model.config.save_pretrained(bin_dir)
    torch.save(whisper_model.state_dict(), bin_dir / "pytorch_model.bin")
    _, from_generation = encoder_from_hf_whisper(whisper_dir)
    for folder in (tmp_path / "whisper_model", bin_dir):
        config, state_dict = encoder_from_hf_whisper(folder)
        assert config.d_model == D_MODEL and config.encoder_ffn_dim == 128 and config.num_mel_bins == N_MELS
        assert state_dict.keys() == from_generation.keys()
        assert all(torch.equal(state_dict[name], from_generation[name]) for name in state_dict)

    (bin_dir / "pytorch_model.bin").unlink()
    with pytest.raises(BuildError, match="no model.safetensors") as error:
        encoder_from_hf_whisper(bin_dir)
    assert str(bin_dir) in str(error.value)


class NotATensor:
    """A pickled object of this class would run arbitrary code under weights_only=False."""


def test_openai_pt_with_pickled_object_is_refused(tmp_path, openai_whisper, capsys):
    _, model, dims = openai_whisper
    bad = tmp_path / "bad.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict(), "extra": NotATensor()}, bad)
    with pytest.raises(BuildError, match="weights_only=True") as error:
        encoder_from_openai_pt(bad)
    assert str(bad) in str(error.value)

    with pytest.raises(SystemExit) as exit_info:  # through the CLI: one line naming the file, exit 1
        main(["init", "--encoder", str(bad), "--llm", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and str(bad) in capsys.readouterr().err


def test_openai_pt_missing_tensor_is_refused(tmp_path, openai_whisper):
    _, model, dims = openai_whisper
    state = model.state_dict()
    del state["encoder.ln_post.weight"]
    truncated = tmp_path / "truncated.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": state}, truncated)
    with pytest.raises(BuildError, match="ln_post.weight") as error:
        encoder_from_openai_pt(truncated)
    assert str(truncated) in str(error.value)


def test_bad_paths_name_the_file(tmp_path, capsys):
    odd = tmp_path / "encoder.txt"
    odd.write_text("not a checkpoint")
    cases = [
        (tmp_path / "missing.pt", tmp_path, "not found"),
        (odd, tmp_path, "unknown encoder kind"),
        (tmp_path, tmp_path / "no_llm", "not found"),
        (tmp_path, tmp_path, "no config.json"),  # a folder that is not an HF Whisper folder
    ]
    for encoder, llm, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["init", "--encoder", str(encoder), "--llm", str(llm), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err, err

    build_tiny(tmp_path / "taken")
    with pytest.raises(SystemExit):
        main(["init", "--tiny", "--out", str(tmp_path / "taken")])
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "--tiny", "--encoder", "w", "--out", "o"],
        ["init", "--tiny", "--from-qwen2-audio", "q", "--out", "o"],
        ["init", "--encoder", "w", "--out", "o"],
        ["init", "--llm", "l", "--out", "o"],
        ["init", "--out", "o"],
        ["init", "--tiny"],
        ["init", "--tiny", "--out", "o", "--dtype", "bf16"],
        ["init", "--tiny", "--out", "o", "--stack", "2"],
        ["init", "--tiny", "--out", "o", "--projector", "stack", "--stack", "0"],
        ["init", "--from-qwen2-audio", "q", "--out", "o", "--projector", "mlp"],
        ["init", "--encoder", "w", "--llm", "l", "--out", "o", "--llm-type", "qwen3"],
        ["init", "--tiny", "--out", "o", "--trust-remote-code"],
        ["init", "--tiny", "--out", "o", "--projector", "conv"],
        [],
    ],
)
def test_argument_errors_are_parser_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
