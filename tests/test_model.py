"""The model on tiny configs: projectors x LLM families, token counts, batch invariance, trainability, gradient
checkpointing, attention kernels and left-padded batched generation. CPU, a few seconds in all."""

from __future__ import annotations

import re

import pytest
import torch

from audiollm.audio import audio_token_count, featurize, mel_frame_count, split_chunks
from audiollm.chat import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN
from audiollm.model.attention import pick_attn_implementation
from audiollm.model.trainable import PARTS, set_trainable

PROJECTORS = [("linear", 1), ("mlp", 1), ("stack", 4)]
PROJECTOR_IDS = [kind for kind, _ in PROJECTORS]
LLMS = ["qwen2", "qwen3"]


def prompt_ids(tokenizer, before: str, audio_tokens: int, after: str) -> list[int]:
    """``before <|audio_bos|> <|AUDIO|> x audio_tokens <|audio_eos|> after`` as token ids, built by hand."""
    ids = tokenizer.convert_tokens_to_ids
    return (
        tokenizer(before).input_ids
        + [ids(AUDIO_BOS)]
        + [ids(AUDIO_TOKEN)] * audio_tokens
        + [ids(AUDIO_EOS)]
        + tokenizer(after).input_ids
    )


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (B, S) ids and attention mask, padded on ``side`` ("left" or "right") to the longest."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for row in rows:
        pad = width - len(row)
        ids.append([pad_id] * pad + row if side == "left" else row + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(row) if side == "left" else [1] * len(row) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def audio_batch_and_prompts(tokenizer, speech_like, stack: int, side: str = "right"):
    """Two clips in two prompts of different lengths, padded on ``side``.

    The clips are 1.37 s and 2.9 s: 137 and 290 mel frames, 34 and 72 tokens (at k=4, 34 ends in a partial group).

    Returns (features batch, input_ids (2, S), attention_mask (2, S), clips).
    """
    clips = [speech_like(1.37, seed=1), speech_like(2.9, seed=2)]
    audio = featurize(clips, stack=stack)
    rows = [
        prompt_ids(tokenizer, "what is this sound", audio.tokens_per_clip[0], "tell me"),
        prompt_ids(tokenizer, "hello", audio.tokens_per_clip[1], "describe the audio please"),
    ]
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, side)
    return audio, input_ids, attention_mask, clips


def training_labels(input_ids, attention_mask, audio_token_id: int) -> torch.Tensor:
    """Labels = ids, with -100 on padding and on audio placeholders (no loss on positions holding audio)."""
    labels = input_ids.clone()
    labels[(attention_mask == 0) | (input_ids == audio_token_id)] = -100
    return labels


def train_loss(model, audio, input_ids, attention_mask) -> torch.Tensor:
    labels = training_labels(input_ids, attention_mask, model.config.audio_token_id)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        input_features=audio.input_features,
        feature_attention_mask=audio.feature_attention_mask,
        labels=labels,
    )
    return out.loss


# ---------------------------------------------------------------------------------------------- forward and counts


@pytest.mark.parametrize("llm", LLMS)
@pytest.mark.parametrize("projector,stack", PROJECTORS, ids=PROJECTOR_IDS)
def test_forward_loss_and_token_counts(tiny_model, tokenizer, speech_like, projector, stack, llm):
    model = tiny_model(projector, llm, stack=stack)
    audio, input_ids, attention_mask, clips = audio_batch_and_prompts(tokenizer, speech_like, stack)

    # The one token-count function agrees with the collator's counts and with what the model emits.
    expected = [audio_token_count(mel_frame_count(len(c)), stack) for c in clips]
    assert audio.tokens_per_clip == expected
    assert expected == ([34, 72] if stack == 1 else [9, 18])  # 137 / 290 mel frames -> 25 Hz -> ceil(n / 4)
    with torch.no_grad():
        embeddings = model.encode_audio(audio.input_features, audio.feature_attention_mask)
    assert embeddings.shape == (sum(expected), model.config.text_config.hidden_size)

    loss = train_loss(model, audio, input_ids, attention_mask)
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("llm", LLMS)
@pytest.mark.parametrize("projector,stack", PROJECTORS, ids=PROJECTOR_IDS)
@pytest.mark.parametrize("extra", [-1, 1])
def test_placeholder_count_mismatch_raises(tiny_model, tokenizer, speech_like, projector, stack, llm, extra):
    model = tiny_model(projector, llm, stack=stack)
    clip = speech_like(1.37, seed=1)
    audio = featurize([clip], stack=stack)
    ids = torch.tensor([prompt_ids(tokenizer, "hello", audio.tokens_per_clip[0] + extra, "")])
    with pytest.raises(ValueError, match=r"expand each clip's placeholder to audio_token_count\(\)"):
        model(input_ids=ids, input_features=audio.input_features, feature_attention_mask=audio.feature_attention_mask)


def test_placeholders_without_audio_raise(tiny_model, tokenizer):
    ids = torch.tensor([prompt_ids(tokenizer, "hello", 3, "")])
    with pytest.raises(ValueError, match=re.escape("3 <|AUDIO|> tokens but no input_features")):
        tiny_model()(input_ids=ids)


# ---------------------------------------------------------------------------------------------- batch invariance


@torch.no_grad()
def encode(model, clips, stack: int) -> torch.Tensor:
    audio = featurize(clips, stack=stack)
    return model.encode_audio(audio.input_features, audio.feature_attention_mask)


# (short, long) seconds. 201 and 501 mel frames are odd: conv2's last stride-2 window reads past the clip's end.
# A 30 s neighbour makes the batch 3000 frames wide, the stock layout's width.
PAIRS = [(2.0, 7.0), (2.01, 7.0), (5.01, 30.0)]


@pytest.mark.parametrize("short_s,long_s", PAIRS, ids=[f"{a}s+{b}s" for a, b in PAIRS])
@pytest.mark.parametrize("projector,stack", PROJECTORS, ids=PROJECTOR_IDS)
def test_clip_encodes_the_same_alone_or_batched(tiny_model, speech_like, projector, stack, short_s, long_s):
    model = tiny_model(projector, stack=stack)
    short, long = speech_like(short_s, seed=3), speech_like(long_s, seed=4)
    alone = encode(model, [short], stack)
    batched = encode(model, [long, short], stack)  # the short clip second: its tokens follow the long clip's
    long_tokens = audio_token_count(mel_frame_count(len(long)), stack)  # 2 s + 7 s at k=1: 50 after 175
    assert batched.shape[0] == long_tokens + alone.shape[0]
    torch.testing.assert_close(batched[long_tokens:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projector,stack", PROJECTORS, ids=PROJECTOR_IDS)
def test_long_clip_is_chunked_into_consecutive_tokens(tiny_model, speech_like, projector, stack):
    model = tiny_model(projector, stack=stack)
    wav = speech_like(65.0, seed=5)
    audio = featurize([wav], stack=stack)

    # 65 s -> 30 s + 30 s + 5 s chunks, one clip, one placeholder run of 750 + 750 + 125 tokens (25 Hz).
    assert audio.input_features.shape == (3, 128, 3000)
    assert audio.feature_attention_mask.sum(-1).tolist() == [3000, 3000, 500]
    per_chunk = [audio_token_count(frames, stack) for frames in (3000, 3000, 500)]
    assert audio.tokens_per_clip == [sum(per_chunk)]
    if stack == 1:
        assert per_chunk == [750, 750, 125]

    # The clip's embeddings are the chunks' embeddings, each featurized and encoded alone, one after the other.
    with torch.no_grad():
        whole = model.encode_audio(audio.input_features, audio.feature_attention_mask)
    chunks = split_chunks(torch.from_numpy(wav))
    parts = [encode(model, [chunk], stack) for chunk in chunks]
    assert [p.shape[0] for p in parts] == per_chunk
    torch.testing.assert_close(whole, torch.cat(parts), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- trainability


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


POLICIES = {
    "projector": dict(encoder=False, projector=True, llm=False),
    "projector+llm": dict(encoder=False, projector=True, llm=True),
    "all": dict(encoder=True, projector=True, llm=True),
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])  # tied: one matrix, embeddings and head
@pytest.mark.parametrize("policy", POLICIES)
def test_set_trainable_updates_only_the_chosen_parts(tiny_model, tokenizer, speech_like, policy, tie):
    flags = POLICIES[policy]
    model = tiny_model("mlp", "qwen3", tie=tie).train()
    assert (model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight) == tie
    counts = set_trainable(model, **flags)

    # Counts: every parameter of a trained part except the encoder's fixed 1500 x 64 position table.
    for part, train in zip(PARTS, flags.values()):
        total = sum(p.numel() for p in getattr(model, part).parameters())
        frozen_positions = 1500 * 64 if part == "audio_tower" else 0
        assert counts[part] == (total - frozen_positions if train else 0)
    assert not model.audio_tower.embed_positions.weight.requires_grad

    before = snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    audio, input_ids, attention_mask, _ = audio_batch_and_prompts(tokenizer, speech_like, 1)
    train_loss(model, audio, input_ids, attention_mask).backward()
    optimizer.step()

    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} is trainable but did not change"
        else:
            assert param.grad is None, f"{name} is frozen but got a gradient"
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"


# ---------------------------------------------------------------------------------------------- checkpointing


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element counter of ``module``'s calls.

    Hook a module inside a checkpointed layer: transformers checkpoints the layer's ``forward`` itself, so the
    layer's own hooks fire once, while its submodules run again when backward recomputes the layer. A pre-hook,
    because torch stops a recomputation early once the last saved tensor is rebuilt (inside the LLM's MLP).
    """
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = train_loss(model, *batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_encoder", [False, True], ids=["encoder-frozen", "encoder-trained"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_model, tokenizer, speech_like, train_encoder):
    model = tiny_model("linear", "qwen2").train()
    set_trainable(model, encoder=train_encoder, projector=True, llm=True)
    audio, input_ids, attention_mask, _ = audio_batch_and_prompts(tokenizer, speech_like, 1)
    batch = (audio, input_ids, attention_mask)
    encoder_calls = count_calls(model.audio_tower.layers[0].fc1)
    llm_calls = count_calls(model.language_model.model.layers[0].mlp)

    loss, grads = loss_and_grads(model, batch)
    assert (encoder_calls[0], llm_calls[0]) == (1, 1)

    # transformers 5's name for gradient_checkpointing_enable (now a deprecated alias); the Trainer calls it for
    # the recipes' `activation_checkpointing: true`, non-reentrant as audiollm.training sets it.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    assert llm_calls[0] == 3  # checkpointing is on: backward ran the LLM layer again
    if train_encoder:
        assert encoder_calls[0] == 3  # and the encoder layer too

    torch.testing.assert_close(loss_ckpt, loss, atol=1e-5, rtol=0)
    assert grads_ckpt.keys() == grads.keys()
    assert any(name.startswith("audio_tower.") for name in grads) == train_encoder
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=0, msg=name)


def test_frozen_encoder_stays_out_of_backward_under_checkpointing(tiny_model, tokenizer, speech_like):
    model = tiny_model("linear", "qwen2").train()
    set_trainable(model, encoder=False, projector=True, llm=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    outputs = []
    model.audio_tower.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    audio, input_ids, attention_mask, _ = audio_batch_and_prompts(tokenizer, speech_like, 1)
    train_loss(model, audio, input_ids, attention_mask)
    assert not outputs[0].requires_grad


# ---------------------------------------------------------------------------------------------- attention kernels


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("llm", LLMS)
def test_eager_and_sdpa_give_the_same_logits(tiny_model, tokenizer, speech_like, llm, side):
    audio, input_ids, attention_mask, _ = audio_batch_and_prompts(tokenizer, speech_like, 1, side)
    logits = {}
    for kernel in ("eager", "sdpa"):
        model = tiny_model("linear", llm, attn_implementation=kernel)
        assert model.audio_tower.config._attn_implementation == kernel
        assert model.language_model.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                input_features=audio.input_features,
                feature_attention_mask=audio.feature_attention_mask,
            ).logits
    real = attention_mask.bool()  # padded query positions are garbage in both kernels, and differ
    torch.testing.assert_close(logits["sdpa"][real], logits["eager"][real], atol=1e-5, rtol=0)


def test_pick_attn_implementation(monkeypatch):
    import audiollm.model.attention as attention

    assert pick_attn_implementation() == "sdpa"  # these test machines have no CUDA
    for cuda, flash, expected in [(True, True, "flash_attention_2"), (True, False, "sdpa"), (False, True, "sdpa")]:
        monkeypatch.setattr(attention.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda flash=flash: flash)
        assert attention.pick_attn_implementation() == expected


# ---------------------------------------------------------------------------------------------- generation


def generate(model, tokenizer, input_ids, attention_mask, audio) -> torch.Tensor:
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        input_features=audio.input_features,
        feature_attention_mask=audio.feature_attention_mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@pytest.mark.parametrize("llm", LLMS)
def test_left_padded_batched_generate_matches_one_by_one(tiny_model, tokenizer, speech_like, llm):
    model = tiny_model("linear", llm, seed=1)  # seed 0's qwen2 greedy-decodes the same 5 ids for both rows
    audio, input_ids, attention_mask, clips = audio_batch_and_prompts(tokenizer, speech_like, 1, side="left")
    batched = generate(model, tokenizer, input_ids, attention_mask, audio)
    width = input_ids.shape[1]
    assert torch.equal(batched[:, :width], input_ids)  # prompt first, then the new ids

    continuations = []
    for row, clip in enumerate(clips):
        prompt = input_ids[row][attention_mask[row].bool()][None]  # the row without its left padding
        alone = generate(model, tokenizer, prompt, torch.ones_like(prompt), featurize([clip]))
        new = alone[0, prompt.shape[1] :]
        # A row that stops early on <|im_end|> is filled with <|endoftext|> in the batch.
        filler = torch.full((5 - new.numel(),), tokenizer.pad_token_id)
        assert torch.equal(batched[row, width:], torch.cat([new, filler])), f"row {row}"
        continuations.append(new.tolist())
    assert continuations[0] != continuations[1]  # the rows depend on their inputs, so the check has teeth


def test_a_new_encoder_has_whisper_sinusoid_positions_frozen(tiny_model):
    from transformers.models.whisper.modeling_whisper import sinusoids

    table = tiny_model("linear", "qwen2").audio_tower.embed_positions.weight
    assert torch.equal(table, sinusoids(*table.shape)) and not table.requires_grad


def test_loaded_models_take_no_hub_kernels_unless_asked(tmp_path):
    """transformers (>= 5.25) kernelizes loaded models by default; on a GPU that fetches kernels from the Hub at the
    first train()/eval(). A folder loads with them off; a caller can still ask for them."""
    from transformers import AutoModelForCausalLM

    from audiollm.build import build_tiny, load_llm
    from audiollm.model.modeling import AudioLLMForConditionalGeneration
    from audiollm.tiny import tiny_tokenizer

    build_tiny(tmp_path / "model")
    assert not AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "model").use_kernels
    llm = AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "model").language_model
    llm.save_pretrained(tmp_path / "llm")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "llm").use_kernels  # the library's own default
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    assert not load_llm(tmp_path / "llm", torch.float32)[0].use_kernels
    assert AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "model", use_kernels=True).use_kernels
