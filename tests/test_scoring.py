"""Zero-shot scoring rules: prompt names, aggregation of member statements, negation contrast."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

import open_clip_ecg  # noqa: F401
from open_clip_ecg.prompts import task_prompts
from open_clip_ecg.scoring import ScoringRules, TaskScorer, aggregate_probabilities
from open_clip_ecg.tasks import get_task
from open_clip_ecg.zeroshot import DEFAULT_TEMPLATES, build_zeroshot_classifier


def test_aggregation_rules_match_a_hand_computed_example():
    p = torch.tensor([[0.2, 0.5, 0.9],
                      [0.0, 0.1, 0.4]])
    members = [[0, 1], [2], [0, 1, 2]]
    expected = {
        "noisy-or": [[1 - 0.8 * 0.5, 0.9, 1 - 0.8 * 0.5 * 0.1], [1 - 1.0 * 0.9, 0.4, 1 - 0.9 * 0.6]],
        "max": [[0.5, 0.9, 0.9], [0.1, 0.4, 0.4]],
        "mean": [[0.35, 0.9, 1.6 / 3], [0.05, 0.4, 0.5 / 3]],
    }
    for rule, values in expected.items():
        torch.testing.assert_close(aggregate_probabilities(p, members, rule), torch.tensor(values))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_probabilities(p, members, "prompt")
    with pytest.raises(ValueError, match="no member statement"):
        aggregate_probabilities(p, [[]], "max")


def test_prompt_name_rules():
    labels = get_task("ptbxl-rhythm").labels
    shipped, _, _ = task_prompts(labels)
    assert shipped["STACH"] == ["sinus tachycardia", "fast sinus rhythm"]
    named, _, sources = task_prompts(labels, rule="name")
    assert named["STACH"] == ["sinus tachycardia"] and sources["STACH"] == "shipped name"
    vocab, _, sources = task_prompts(labels, rule="vocabulary", vocabulary_names={"STACH": "sinus tachycardia (vocab)"})
    assert vocab["STACH"] == ["sinus tachycardia (vocab)"] and sources["STACH"] == "vocabulary"
    assert vocab["SBRAD"] == ["sinus bradycardia"]  # not in the vocabulary: the shipped name
    with pytest.raises(ValueError, match="unknown prompt names"):
        task_prompts(labels, rule="synonyms")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    model = open_clip.create_model("ECG-RN18-CLIPText").eval()
    return model, open_clip.get_tokenizer("ECG-RN18-CLIPText")


def test_superclass_scores_aggregate_their_member_statements(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("ptbxl-super")
    scorer = TaskScorer(model, tokenizer, task, ScoringRules("name", "noisy-or", "sigmoid"))
    codes = [label.code for label in scorer.prompted]
    mi = scorer.members[task.codes.index("MI")]
    assert {codes[i] for i in mi} == set(task.labels[task.codes.index("MI")].members["scp"])
    assert {"IMI", "AMI"} <= {codes[i] for i in mi}
    embeddings = torch.randn(5, 256)
    statement = torch.sigmoid(model.logit_scale.exp() * F.normalize(embeddings) @ scorer.positive.T + model.logit_bias)
    expected = 1 - torch.prod(1 - statement[:, mi], dim=1)
    torch.testing.assert_close(scorer.scores(embeddings)[:, task.codes.index("MI")], expected.detach())
    described = scorer.describe()
    assert described["aggregate"] == "noisy-or" and "IMI" in described["members"]["MI"]


def test_contrast_scoring_compares_a_finding_with_its_negation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("ptbxl-rhythm")
    scorer = TaskScorer(model, tokenizer, task, ScoringRules("name", "prompt", "contrast"))
    af = task.codes.index("AFIB")
    positive = build_zeroshot_classifier(model, tokenizer, ["atrial fibrillation"], DEFAULT_TEMPLATES)
    negative = build_zeroshot_classifier(model, tokenizer, ["no atrial fibrillation"], DEFAULT_TEMPLATES)
    embeddings = torch.randn(4, 256)
    e = F.normalize(embeddings)
    expected = torch.sigmoid(model.logit_scale.exp() * (e @ positive.T - e @ negative.T))[:, 0]
    torch.testing.assert_close(scorer.scores(embeddings)[:, af], expected.detach())
    assert "no ' + finding" in scorer.describe()["formula"]


def test_prompt_rule_and_single_member_aggregation_agree(model_and_tokenizer):
    """A label whose only member is itself scores the same with or without aggregation."""
    model, tokenizer = model_and_tokenizer
    task = get_task("ptbxl-rhythm")
    embeddings = torch.randn(3, 256)
    by_prompt = TaskScorer(model, tokenizer, task, ScoringRules("name", "prompt")).scores(embeddings)
    by_members = TaskScorer(model, tokenizer, task, ScoringRules("name", "max")).scores(embeddings)
    torch.testing.assert_close(by_prompt, by_members)
