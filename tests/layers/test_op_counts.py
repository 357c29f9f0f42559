"""What one adapted nn.Linear launches, DoRA against LoRA, counted exactly
(``dorafit.bench.count_layer_ops``: a TorchDispatchMode that sees every aten operator of the
forward and the backward, views excluded).

On a GPU each operator is at least one kernel launch and each elementwise pass over a
(tokens, out) tensor is memory traffic, so these counts are the layer's cost there. LoRA's call
is its matmuls alone (three forward, five backward, no elementwise pass: ``functional.lora_linear``),
so DoRA − LoRA is everything DoRA adds, and what is held is that floor, item by item:

- a training step right after an optimizer step (the norm due): n² (A W0ᵀ and A Aᵀ, or A's rows
  stacked on the tokens, one addmm, one baddbmm and the floor), g = m / √n² in one batch-norm
  call, the output's scaling, and backward the batch-norm pass and ∂L/∂m's division (0 / 0 read
  as 0), the zero statistics kept by the layer: 10 operators (9 stacked);
- a gradient-accumulation micro-batch (n² kept): g, the scaling, the backward's three and the
  magnitude's gradient accumulated: 6;
- evaluation and one-token decode: the scaling alone, 1;
- the elementwise bytes: in training DoRA writes exactly two (tokens, out) tensors (the
  forward's in-place scaling, and g ⊙ grad_y in backward, which also gives the magnitude's
  reduction); in evaluation and decode one (the in-place scaling). With more tokens than inputs
  g scales the rows of W0 and B instead (paths ``dora-linear-rows``, ``dora-no-grad-rows``):
  none, for 3 operators more in training (g ⊙ W0 made forward and again backward, B's gradient
  scaled by g, g ⊙ B) and 1 more in evaluation. "Of that size" means tokens × out or tokens × in
  elements: the shapes below keep the adapter's gradients and g ⊙ W0 (out × in) off those sizes;
- no operator reads a value on the host.

Three shapes: fewer tokens than inputs (the base and low-rank matmuls apart), few tokens against
the output width (A's rows stacked on the tokens in one matmul when the norm is due), and more
tokens than inputs (g on the rows of W0).
"""

from __future__ import annotations

from collections import Counter

import pytest

from dorafit.bench import count_layer_ops

# (tokens, in, out): the matmuls apart; A's rows stacked (4 · tokens < out); g on W0's rows
# (tokens > in). All above 2^15 outputs, where the magnitude's reduction is one batch-norm
# backward call (below: mul and sum).
SHAPES = [(256, 512, 384), (64, 256, 1024), (512, 256, 384)]
EXTRA_OPS = {"train": 10, "accumulation": 6, "eval": 1, "decode": 1}
EXTRA_OPS_ROWS = {"train": 13, "accumulation": 9, "eval": 2, "decode": 1}


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


def test_what_dora_adds_in_a_training_step():
    """The train row item by item: LoRA's operators are all in DoRA's call, and DoRA adds exactly
    the norm, g, the scaling and the backward's pass with ∂L/∂m."""
    lora = count_layer_ops("lora", 256, 512, 384, "train", rank=8)
    dora = count_layer_ops("dora", 256, 512, 384, "train", rank=8)
    assert not Counter(lora.ops) - Counter(dora.ops), (lora.ops, dora.ops)
    assert Counter(dora.ops) - Counter(lora.ops) == Counter(
        {"mm": 2, "addmm": 1, "baddbmm": 1, "clamp_min": 1,  # n²: A W0ᵀ, A Aᵀ, ..., the floor
         "native_batch_norm": 1, "mul_": 1,  # g = m / √n², y ⊙= g
         "native_batch_norm_backward": 1, "div_": 1, "nan_to_num_": 1}  # the pass, ∂L/∂m
    ), dora.ops


def test_the_count_sees_every_operator():
    """The counter is not blind: LoRA's training call is its three matmuls forward and the five
    of their gradients backward (the input's two summed in place), with no elementwise pass."""
    lora = count_layer_ops("lora", 64, 32, 32, "train", rank=4)
    assert sorted(lora.ops) == sorted(["mm", "mm", "addmm_", "addmm", "addmm", "mm", "mm", "addmm_"]), lora.ops
    assert lora.elementwise_bytes == 0
