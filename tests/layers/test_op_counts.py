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
  reduction); in evaluation and decode one (the in-place scaling). With more tokens than inputs
  g scales the rows of W0 and B instead (paths ``dora-linear-rows``, ``dora-no-grad-rows``):
  none, for at most 12 operators more than LoRA in training (g ⊙ W0 made again in backward, and
  B's gradient scaled by g). "Of that size" means tokens × out or tokens × in elements: the
  shapes below keep the adapter's gradients and g ⊙ W0 (out × in) off those sizes;
- no operator reads a value on the host.

Three shapes: fewer tokens than inputs (the base and low-rank matmuls apart), few tokens against
the output width (A's rows stacked on the tokens in one matmul when the norm is due), and more
tokens than inputs (g on the rows of W0).
"""

from __future__ import annotations

import pytest

from dorafit.bench import count_layer_ops

# (tokens, in, out): the matmuls apart; A's rows stacked (4 · tokens < out); g on W0's rows
# (tokens > in). All above 2^15 outputs, where the magnitude's reduction is one batch-norm
# backward call (below: mul and sum).
SHAPES = [(256, 512, 384), (64, 256, 1024), (512, 256, 384)]
EXTRA_OPS = {"train": 10, "accumulation": 10, "eval": 3, "decode": 3}
EXTRA_OPS_ROWS = {"train": 12, "accumulation": 10, "eval": 3, "decode": 3}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=["apart", "stacked", "rows"])
@pytest.mark.parametrize("call", list(EXTRA_OPS))
def test_dora_launches_at_most_the_target_over_lora(call, shape, bias):
    tokens, in_f, out_f = shape
    lora = count_layer_ops("lora", tokens, in_f, out_f, call, rank=8, bias=bias)
    dora = count_layer_ops("dora", tokens, in_f, out_f, call, rank=8, bias=bias)
    rows = 1 if call == "decode" else tokens
    on_w0 = rows > in_f  # g scales the rows of W0 and B, not the output
    assert len(dora) - len(lora) <= (EXTRA_OPS_ROWS if on_w0 else EXTRA_OPS)[call], (lora.ops, dora.ops)
    assert lora.syncs == dora.syncs == 0
    passes = 0 if on_w0 else (2 if call in ("train", "accumulation") else 1)
    assert dora.elementwise_bytes == passes * rows * out_f * 4, dora.ops
    if on_w0 and call in ("train", "accumulation"):
        # What it writes instead: g ⊙ W0 forward and again backward, beyond LoRA's own small
        # tensors, plus (out,)- and (out, r)-sized vectors (g, g ⊙ B, the magnitude's sums).
        weight_bytes, more = 2 * out_f * in_f * 4, dora.other_bytes - lora.other_bytes
        assert weight_bytes <= more < weight_bytes + 32 * out_f * 4, (more, weight_bytes)


def test_the_count_sees_every_operator():
    """The counter is not blind: LoRA's training call is its three matmuls forward, their
    gradients backward, and the sum of the two input gradients."""
    lora = count_layer_ops("lora", 64, 32, 32, "train", rank=4)
    assert lora.ops.count("mm") + lora.ops.count("addmm") >= 6, lora.ops
    assert lora.elementwise_bytes == 64 * 32 * 4  # the (tokens, in) sum of the input gradients
