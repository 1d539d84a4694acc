"""Output-level adaptation of frozen models: CrossTune, CQD^A-style score calibration, CoRA-style injection.

Each test trains only the module on top and checks, with numbers, that it beats the frozen model or
its zero-shot use while the frozen model gets no gradient. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.adaptation import CalibratedScorer, CoRA, CrossTune, ScoreCalibration, frozen_features, nearest_label
from peftlab.adaptation.blackbox import mean_pool

from .conftest import tiny_bert

# --------------------------------------------------------------------------------------------------
# CrossTune

CLASSES, KEYWORDS, LENGTH = 4, 6, 16


class KeywordTask:
    """Few-shot text classification through a frozen tiny BERT.

    Each class has 6 keywords and a 3-word label description; the frozen encoder's embeddings put a
    class's keywords and description words around a shared class direction, so descriptions carry
    meaning. An input is 16 tokens, 2 of them keywords of its class, the rest filler. The few shots
    use keywords 0-2 only; test inputs use keywords 3-5, which no shot contained.
    """

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        tokens = torch.randperm(125, generator=self.gen) + 3
        self.keywords = tokens[:CLASSES * KEYWORDS].view(CLASSES, KEYWORDS)
        self.descriptions = tokens[CLASSES * KEYWORDS:CLASSES * (KEYWORDS + 3)].view(CLASSES, 3)
        self.filler = tokens[CLASSES * (KEYWORDS + 3):]
        self.model = tiny_bert(seed)
        self._give_meaning()

    @torch.no_grad()
    def _give_meaning(self):
        table = self.model.embeddings.word_embeddings.weight
        std, width = table.std().item(), table.shape[1]
        directions = torch.randn(CLASSES, width, generator=self.gen)
        for c in range(CLASSES):
            for token in [*self.keywords[c], *self.descriptions[c]]:
                table[token] = std * (directions[c] + torch.randn(width, generator=self.gen)) / math.sqrt(2)

    def sample(self, n: int, unseen_keywords: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=self.gen)
        ids = self.filler[torch.randint(0, len(self.filler), (n, LENGTH), generator=self.gen)]
        low = KEYWORDS // 2 if unseen_keywords else 0
        for i in range(n):
            slots = torch.randperm(LENGTH, generator=self.gen)[:2]
            ids[i, slots] = self.keywords[y[i], torch.randint(low, low + KEYWORDS // 2, (2,), generator=self.gen)]
        return ids, y

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return frozen_features(self.model, input_ids=ids, attention_mask=torch.ones_like(ids))


def test_crosstune_beats_zero_shot_and_the_frozen_model_gets_no_gradient():
    task = KeywordTask()
    assert all(p.requires_grad for p in task.model.parameters())  # frozen by access, not by flags
    train_ids, train_y = task.sample(CLASSES * 4, unseen_keywords=False)  # 4 shots per class
    test_ids, test_y = task.sample(500, unseen_keywords=True)
    labels, train, test = task.encode(task.descriptions), task.encode(train_ids), task.encode(test_ids)
    assert not (labels.requires_grad or train.requires_grad)

    def accuracy(scores):
        return (scores.argmax(-1) == test_y).float().mean().item()

    zero_shot = accuracy(nearest_label(test, labels))
    probe = nn.Linear(train.shape[-1], CLASSES)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(probe(mean_pool(train)), train_y).backward()
        optimizer.step()
    linear_probe = accuracy(probe(mean_pool(test)).detach())

    torch.manual_seed(0)
    head = CrossTune(labels)
    with torch.no_grad():
        untrained = accuracy(head(test))
    losses = head.fit(train, train_y, steps=200, lr=1e-3)
    with torch.no_grad():
        trained = accuracy(head(test))
    print(f"\nCrossTune, 4 shots/class, unseen keywords at test: nearest label {zero_shot:.3f}, "
          f"linear probe {linear_probe:.3f}, CrossTune untrained {untrained:.3f}, trained {trained:.3f} "
          f"(train loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    assert trained >= zero_shot + 0.1 and trained >= linear_probe + 0.1
    assert all(p.grad is None for p in task.model.parameters())


def test_crosstune_ignores_padding_and_checks_heads():
    gen = torch.Generator().manual_seed(0)
    head = CrossTune(torch.randn(3, 5, 8, generator=gen), heads=2)
    features = torch.randn(2, 6, 8, generator=gen)
    padded = torch.cat([features, torch.randn(2, 4, 8, generator=gen)], 1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], 1)
    torch.testing.assert_close(head(padded, mask), head(features))
    assert head(features[:, 0]).shape == (2, 3)  # pooled (B, d) inputs work too
    with pytest.raises(peftlab.ConfigError):
        CrossTune(torch.randn(3, 8), heads=3)


# --------------------------------------------------------------------------------------------------
# CQD^A score calibration

ENTITIES = 200


class MiscalibratedLinkPredictor(nn.Module):
    """Scores (heads, relation) -> all tails: an informative signal, but relation 0 is overconfident
    (scale 6, offset +2) and relation 1 underconfident (scale 0.4, offset -3)."""

    def __init__(self, truth: torch.Tensor, gen: torch.Generator):
        super().__init__()
        signal = truth.float() + 0.6 * torch.randn(truth.shape, generator=gen)
        scale, offset = torch.tensor([6.0, 0.4]), torch.tensor([2.0, -3.0])
        self.table = nn.Parameter(scale[:, None, None] * signal + offset[:, None, None])

    def forward(self, heads, relations):
        return self.table[relations, heads]


def intersection_queries(truth, n, gen):
    """2i queries (h1 -r0-> ?t <-r1- h2) with a known answer t."""
    rows = []
    while len(rows) < n:
        t = torch.randint(0, ENTITIES, (1,), generator=gen).item()
        h1, h2 = truth[0, :, t].nonzero().flatten(), truth[1, :, t].nonzero().flatten()
        if len(h1) and len(h2):
            rows.append((h1[torch.randint(0, len(h1), (1,), generator=gen)].item(),
                         h2[torch.randint(0, len(h2), (1,), generator=gen)].item(), t))
    return torch.tensor(rows).unbind(1)


def answer_scores(scorer, h1, h2):
    """CQD: sigmoid atom scores combined by the product t-norm."""
    r0, r1 = torch.zeros_like(h1), torch.ones_like(h2)
    if isinstance(scorer, CalibratedScorer):
        return torch.sigmoid(scorer(h1, r0, relation=r0)) * torch.sigmoid(scorer(h2, r1, relation=r1))
    return torch.sigmoid(scorer(h1, r0)) * torch.sigmoid(scorer(h2, r1))


def filtered_mrr(scores, truth, h1, h2, t):
    answers = truth[0, h1] & truth[1, h2]
    target = scores.gather(1, t[:, None])
    return (1.0 / (((scores > target) & ~answers).sum(1) + 1).float()).mean().item()


def query_nll(scores, t):
    return F.cross_entropy(torch.log(scores.clamp_min(1e-30)), t)


def test_score_calibration_improves_complex_query_answering_with_the_scorer_frozen():
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(2, ENTITIES, ENTITIES, generator=gen) < 0.03
    scorer = MiscalibratedLinkPredictor(truth, gen)
    frozen = scorer.table.detach().clone()
    train, test = intersection_queries(truth, 200, gen), intersection_queries(truth, 500, gen)
    with torch.no_grad():
        mrr_before = filtered_mrr(answer_scores(scorer, *test[:2]), truth, *test)
        nll_before = query_nll(answer_scores(scorer, *test[:2]), test[2]).item()

    model = CalibratedScorer(scorer, ScoreCalibration(relations=2))
    with torch.no_grad():
        torch.testing.assert_close(answer_scores(model, *test[:2]), answer_scores(scorer, *test[:2]), atol=0, rtol=0)
    optimizer = torch.optim.Adam(model.calibration.parameters(), lr=0.05)
    for _ in range(200):  # CQD^A's 1-vs-all loss through the t-norm
        optimizer.zero_grad()
        query_nll(answer_scores(model, *train[:2]), train[2]).backward()
        optimizer.step()
    with torch.no_grad():
        mrr_after = filtered_mrr(answer_scores(model, *test[:2]), truth, *test)
        nll_after = query_nll(answer_scores(model, *test[:2]), test[2]).item()
    alpha_beta = model.calibration.per_relation.detach()
    shown = [[round(v, 2) for v in row] for row in alpha_beta.tolist()]
    print(f"\nCQD^A calibration on 2i queries: filtered MRR {mrr_before:.3f} -> {mrr_after:.3f}, "
          f"NLL {nll_before:.3f} -> {nll_after:.3f}; (alpha, beta) per relation {shown}")
    assert mrr_after >= mrr_before + 0.05 and nll_after < nll_before - 0.5
    assert alpha_beta[0, 0] < 0 < alpha_beta[1, 0]  # shrinks the overconfident relation, stretches the other
    assert scorer.table.grad is None and torch.equal(scorer.table, frozen) and not scorer.table.requires_grad


def test_conditional_calibration_starts_near_identity_and_broadcasts():
    gen = torch.Generator().manual_seed(0)
    calibration = ScoreCalibration(relations=3, query_dim=6, candidate_dim=5)
    scores = torch.randn(4, 7, generator=gen)
    out = calibration(scores, relation=torch.tensor([0, 1, 2, 0]), query=torch.randn(4, 6, generator=gen),
                      candidates=torch.randn(7, 5, generator=gen))
    assert out.shape == (4, 7)
    torch.testing.assert_close(out, scores, atol=0.01, rtol=0.01)  # the official 1e-3 initialisation
    with pytest.raises(peftlab.ConfigError):
        calibration(scores, relation=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(peftlab.ConfigError):
        ScoreCalibration()


# --------------------------------------------------------------------------------------------------
# CoRA

WINDOW, WIDTH = 8, 16


def series(length: int = 2000, seed: int = 0):
    """y_t = 0.5 y_{t-1} + u_{t-1} + noise, with u an AR(1) covariate and z an unrelated AR(1) series."""
    gen = torch.Generator().manual_seed(seed)
    u, z, y = torch.zeros(length), torch.zeros(length), torch.zeros(length)
    shocks = torch.randn(3, length, generator=gen)
    for t in range(1, length):
        u[t] = 0.8 * u[t - 1] + shocks[0, t]
        z[t] = 0.8 * z[t - 1] + shocks[1, t]
        y[t] = 0.5 * y[t - 1] + u[t - 1] + 0.3 * shocks[2, t]

    def windows(s):  # the window ending at t-1 predicts y_t
        return s.unfold(0, WINDOW, 1)[:-1]

    return windows(y), windows(u), windows(z), y[WINDOW:]


def pretrained_forecaster(history, target):
    """The 'foundation model': a frozen backbone (window -> embedding) and head, trained on the target alone."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(WINDOW, 32), nn.Tanh(), nn.Linear(32, WIDTH))
    head = nn.Linear(WIDTH, 1)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.mse_loss(head(backbone(history)).squeeze(-1), target).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return backbone, head


def fit_cora(backbone, head, history, covariates, target, steps: int = 300):
    torch.manual_seed(0)
    model = CoRA(backbone, head, WIDTH, [c.shape[-1] for c in covariates])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(history, covariates).squeeze(-1), target).backward()
        optimizer.step()
    return model


def test_cora_starts_as_the_base_model_and_learns_from_an_informative_covariate():
    history, informative, unrelated, target = series()
    half = len(target) // 2
    backbone, head = pretrained_forecaster(history[:half], target[:half])
    frozen = {n: p.detach().clone() for n, p in [*backbone.named_parameters(), *head.named_parameters()]}
    with torch.no_grad():  # covariate series are embedded by the same frozen backbone, as in the paper
        covariates = [backbone(informative), backbone(unrelated)]

    untrained = CoRA(backbone, head, WIDTH, [WIDTH, WIDTH])
    with torch.no_grad():
        assert torch.equal(untrained(history, covariates), head(backbone(history)))

    def test_mse(model, covs):
        with torch.no_grad():
            return F.mse_loss(model(history[half:], [c[half:] for c in covs]).squeeze(-1), target[half:]).item()

    with torch.no_grad():
        base = F.mse_loss(head(backbone(history[half:])).squeeze(-1), target[half:]).item()
    both = fit_cora(backbone, head, history[:half], [c[:half] for c in covariates], target[:half])
    only_unrelated = fit_cora(backbone, head, history[:half], [covariates[1][:half]], target[:half])
    with_both, with_unrelated = test_mse(both, covariates), test_mse(only_unrelated, covariates[1:])
    weights = both.covariate_weights().tolist()
    print(f"\nCoRA test MSE: base {base:.3f}, with the unrelated covariate only {with_unrelated:.3f}, "
          f"with informative + unrelated {with_both:.3f}; Granger weights (informative, unrelated) "
          f"{weights[0]:.2f}, {weights[1]:.2f}")
    assert with_both <= 0.5 * base and with_unrelated >= 0.9 * base
    assert weights[0] > weights[1]
    parameters = dict([*backbone.named_parameters(), *head.named_parameters()])
    assert all(p.grad is None and torch.equal(p, frozen[n]) for n, p in parameters.items())


def test_cora_checks_covariate_count():
    model = CoRA(nn.Linear(4, 6), nn.Linear(6, 1), 6, [3, 2], granger=False)
    torch.testing.assert_close(model.covariate_weights(), torch.tensor([0.5, 0.5]))
    with pytest.raises(peftlab.ConfigError):
        model(torch.randn(2, 4), [torch.randn(2, 3)])
    with pytest.raises(peftlab.ConfigError):
        CoRA(nn.Linear(4, 6), nn.Linear(6, 1), 6, [])
