"""What one adapted nn.Linear launches, DoRA against LoRA, counted exactly
(``dorafit.bench.count_layer_ops``: a TorchDispatchMode that sees every aten operator of the
forward and the backward, views excluded).

On a GPU each operator is at least one kernel launch and each elementwise pass over a
(tokens, out) tensor is memory traffic, so these counts are the layer's cost there. Held:

- a training step right after an optimizer step (the norm due) and a gradient-accumulation
  micro-batch (the norm kept): at most 10 operators more than LoRA;
- evaluation and one-token decode: at most 3 more;
- the elementwise bytes: in training DoRA writes exactly two (tokens, out) tensors (the
  forward's in-place scaling, and g ⊙ grad_y in backward, which also gives the magnitude's
  reduction); in evaluation and decode one (the in-place scaling), or none with more tokens
  than inputs (g scales the rows of W0 and B instead). "Of that size" means tokens × out or
  tokens × in elements: the shapes below keep the adapter's gradients off those sizes;
- no operator reads a value on the host.

Two shapes: many tokens (the base and low-rank matmuls apart), and few tokens against the output
width (A's rows stacked on the tokens in one matmul when the norm is due).
"""

from __future__ import annotations

import pytest

from dorafit.bench import count_layer_ops

# (tokens, in, out): the matmuls apart; A's rows stacked (2 · tokens < out). Both above 2^15
# outputs, where the magnitude's reduction is one batch-norm backward call (below: mul and sum).
SHAPES = [(512, 256, 256), (64, 256, 1024)]
EXTRA_OPS = {"train": 10, "accumulation": 10, "eval": 3, "decode": 3}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=["apart", "stacked"])
@pytest.mark.parametrize("call", list(EXTRA_OPS))
def test_dora_launches_at_most_the_target_over_lora(call, shape, bias):
    tokens, in_f, out_f = shape
    lora = count_layer_ops("lora", tokens, in_f, out_f, call, rank=8, bias=bias)
    dora = count_layer_ops("dora", tokens, in_f, out_f, call, rank=8, bias=bias)
    assert len(dora) - len(lora) <= EXTRA_OPS[call], (lora.ops, dora.ops)
    assert lora.syncs == dora.syncs == 0
    rows = 1 if call == "decode" else tokens
    # Without autograd: one in-place scaling, or none where g scales the rows of W0 and B.
    passes = 2 if call in ("train", "accumulation") else (0 if rows > in_f else 1)
    assert dora.elementwise_bytes == passes * rows * out_f * 4, dora.ops


def test_the_count_sees_every_operator():
    """The counter is not blind: LoRA's training call is its three matmuls forward, their
    gradients backward, and the sum of the two input gradients."""
    lora = count_layer_ops("lora", 64, 32, 32, "train", rank=4)
    assert lora.ops.count("mm") + lora.ops.count("addmm") >= 6, lora.ops
    assert lora.elementwise_bytes == 64 * 32 * 4  # the (tokens, in) sum of the input gradients
