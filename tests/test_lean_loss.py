"""The memory-lean cross-entropy equals the plain loss in value and gradients, on its own and inside the model."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from audiollm.collator import IGNORE_INDEX, ChatCollator
from audiollm.loss import chunked_causal_lm_loss

VOCAB, HIDDEN = 301, 24


def labelled(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(B, S) random labels with about half the positions ignored and the first row's tail padded."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.5] = IGNORE_INDEX
    labels[0, shape[1] // 2 :] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("num_items", [None, 40])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk, num_items):
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(3, 17, HIDDEN, requires_grad=True)
    labels = labelled((3, 17))
    count = None if num_items is None else torch.tensor(num_items)

    plain = ForCausalLMLoss(head(hidden), labels, VOCAB, num_items_in_batch=count)
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight])
    lean = chunked_causal_lm_loss(hidden, labels, head, count, chunk_tokens=chunk)
    lean_grads = torch.autograd.grad(lean, [hidden, head.weight])

    torch.testing.assert_close(lean, plain, atol=1e-6, rtol=1e-6)
    for got, want in zip(lean_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert lean_grads[0][0, -1].abs().sum() == 0  # an unlabelled position gets no gradient through the loss


def test_no_labelled_token_gives_a_connected_zero():
    head = torch.nn.Linear(HIDDEN, VOCAB)
    hidden = torch.randn(1, 5, HIDDEN, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.full((1, 5), IGNORE_INDEX), head)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad is not None


def test_only_labelled_positions_reach_the_head():
    """The head sees N labelled rows, never (B * S): the full logits are not built."""
    seen = []
    head = torch.nn.Linear(HIDDEN, VOCAB)
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    labels = labelled((2, 30), seed=3)
    with torch.no_grad():
        chunked_causal_lm_loss(torch.randn(2, 30, HIDDEN), labels, head, chunk_tokens=8)
    wanted = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert sum(seen) == wanted < 60 and max(seen) <= 8


@pytest.mark.parametrize("tie", [False, True])
def test_model_switch_gives_the_plain_loss_and_gradients(tokenizer, tiny_model, speech_like, tie):
    model = tiny_model(tie=tie).train()
    rows = [{"messages": [{"role": "user", "content": "<audio>What is it?"},
                          {"role": "assistant", "content": answer}], "audios": [speech_like(s, seed=i)]}
            for i, (s, answer) in enumerate([(1.0, "a red cat"), (0.5, "the moon and the sun")])]
    batch = ChatCollator(tokenizer)(rows)
    results = []
    for chunk in (0, 5):
        model.loss_chunk_tokens = chunk
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.loss.detach(), grads, out.logits))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    assert results[0][2] is not None and results[1][2] is None  # the lean path returns no logits
