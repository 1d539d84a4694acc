"""Test-time adaptation on synthetic shifted streams: LAME corrects outputs, PSMT adapts and forgets little.

Data: Gaussian class clusters in 8 dimensions, an MLP trained on the clean (source) domain, and
covariate shifts at test time. Run with ``-s`` to see the measured accuracies.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.adaptation import LAME, PSMT, Tent, use_batch_statistics
from peftlab.adaptation.tta import affinity_matrix, laplacian_assignment, quantile

DIM, CLASSES, BATCH = 8, 4, 64


class Clusters:
    """Gaussian class clusters; ``corrupt`` is a covariate shift applied to the inputs."""

    def __init__(self, seed: int, spread: float = 2.0):
        self.gen = torch.Generator().manual_seed(seed)
        self.means = torch.randn(CLASSES, DIM, generator=self.gen) * spread

    def sample(self, n: int, corrupt=None) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=self.gen)
        x = self.means[y] + torch.randn(n, DIM, generator=self.gen)
        return (x if corrupt is None else corrupt(x)), y


class Classifier(nn.Module):
    def __init__(self, norm: bool = False, hidden: int = 32):
        super().__init__()
        norm_layer = (lambda: nn.BatchNorm1d(hidden)) if norm else nn.Identity
        self.body = nn.Sequential(nn.Linear(DIM, hidden), norm_layer(), nn.ReLU(),
                                  nn.Linear(hidden, hidden), norm_layer(), nn.ReLU())
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def train_source(data: Clusters, norm: bool, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(norm)
    x, y = data.sample(2000)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        rows = torch.randint(0, len(y), (128,), generator=data.gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return model.eval()


def batches(x: torch.Tensor, y: torch.Tensor, size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def accuracy(predictions, stream) -> float:
    hits = [p.argmax(-1) == y for p, (_, y) in zip(predictions, stream)]
    return torch.cat(hits).float().mean().item()


@torch.no_grad()
def accuracy_of(predict, stream) -> float:
    return accuracy((predict(x) for x, _ in stream), stream)


# --------------------------------------------------------------------------------------------------
# LAME


def test_affinities_follow_the_official_definitions():
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(20, 6, generator=gen), dim=-1)
    knn = affinity_matrix(feats, "kNN", knn=3)
    assert torch.equal(knn.sum(1), torch.full((20,), 3.0)) and knn.diagonal().sum() == 0
    dist = torch.cdist(feats, feats)
    nearest = dist.masked_fill(torch.eye(20, dtype=torch.bool), float("inf")).argmin(1)
    assert torch.all(knn[torch.arange(20), nearest] == 1)
    rbf = affinity_matrix(feats, "rbf", knn=5)
    sigma = dist.sort(1).values[:, 4].mean()  # 5th smallest distance, the point itself counted
    torch.testing.assert_close(rbf, torch.exp(-dist**2 / (2 * sigma**2)))
    torch.testing.assert_close(affinity_matrix(feats, "linear"), feats @ feats.T)
    with pytest.raises(peftlab.ConfigError):
        affinity_matrix(feats, "cosine")


def test_laplacian_assignment_reaches_the_fixed_point():
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(16, 5, generator=gen).softmax(-1)
    kernel = affinity_matrix(F.normalize(torch.randn(16, 4, generator=gen), dim=-1), "rbf")
    z = laplacian_assignment(probs, kernel)
    torch.testing.assert_close(z, (torch.log(probs + 1e-10) + kernel @ z).softmax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(laplacian_assignment(probs, torch.zeros(16, 16)), probs, atol=1e-6, rtol=0)


def test_lame_corrects_a_shifted_non_iid_stream():
    """Noise-corrupted inputs arriving class by class (the paper's non-i.i.d. scenario): LAME's Laplacian
    term lets each batch's neighbours outvote noisy predictions. On an i.i.d. stream it stays harmless."""
    data = Clusters(seed=0, spread=2.5)
    model = train_source(data, norm=False)
    state = copy.deepcopy(model.state_dict())
    noise = torch.Generator().manual_seed(3)
    x, y = data.sample(1024, corrupt=lambda x: x + 2.0 * torch.randn(x.shape, generator=noise))
    order = torch.argsort(y, stable=True)
    non_iid, iid = batches(x[order], y[order]), batches(x, y)

    lame = LAME(model, features=model.body)
    before, after = accuracy_of(model, non_iid), accuracy(lame.run(x for x, _ in non_iid), non_iid)
    iid_before, iid_after = accuracy_of(model, iid), accuracy(lame.run(x for x, _ in iid), iid)
    lame.close()
    print(f"\nLAME non-i.i.d. stream: {before:.3f} -> {after:.3f}; i.i.d. stream: {iid_before:.3f} -> {iid_after:.3f}")
    assert after >= before + 0.02
    assert iid_after >= iid_before - 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # parameter-free


def test_lame_features_by_callable_match_the_hooked_submodule():
    data = Clusters(seed=1)
    model = train_source(data, norm=False)
    x, _ = data.sample(BATCH, corrupt=lambda x: x + 1.0)
    hooked = LAME(model, features=model.body, affinity="kNN")
    by_callable = LAME(model, features=lambda batch: model.body(batch), affinity="kNN")
    torch.testing.assert_close(hooked(x), by_callable(x))
    hooked.close()
    assert not model.body._forward_hooks
    with pytest.raises(peftlab.ConfigError):
        LAME(model, features=model.body, affinity="cosine")


# --------------------------------------------------------------------------------------------------
# PSMT


def corruption(seed: int, severity: float = 1.0):
    """A fixed random affine corruption of the inputs: mixing, per-feature scale and offset."""
    gen = torch.Generator().manual_seed(100 + seed)
    scale = torch.exp(severity * torch.randn(DIM, generator=gen))
    offset = 2 * severity * torch.randn(DIM, generator=gen)
    mix = torch.eye(DIM) + 0.5 * severity * torch.randn(DIM, DIM, generator=gen) / math.sqrt(DIM)
    return lambda x: (x @ mix.T) * scale + offset


def continual_scenario(seed: int) -> dict[str, tuple[float, float]]:
    """(accuracy on the shifted stream, accuracy on the clean domain afterwards) per adapter: three
    corrupted domains in a row (150 batches each), then back to the clean source domain."""
    data = Clusters(seed=seed)
    source = train_source(data, norm=True, seed=seed)
    stream = [data.sample(BATCH, corruption(domain)) for domain in range(3) for _ in range(150)]
    clean = batches(*data.sample(4096))
    source_batches = [x for x, _ in batches(*data.sample(512))]
    results = {"source model": (accuracy_of(source, stream), accuracy_of(source, clean))}
    norm_only = use_batch_statistics(copy.deepcopy(source))  # how much the test-batch statistics alone give
    results["batch-norm stats"] = (accuracy_of(norm_only, stream), accuracy_of(norm_only, clean))
    adapters = {
        "tent": lambda m: Tent(m, lr=3e-2),
        "mean teacher": lambda m: PSMT(m, lr=3e-2, momentum=0.9, fisher_weight=0, restore_quantile=0),
        "psmt": lambda m: PSMT(m, lr=3e-2, momentum=0.9, source=source_batches, fisher_weight=5000.0),
    }
    for name, make in adapters.items():
        adapter = make(use_batch_statistics(copy.deepcopy(source)))
        online = accuracy(adapter.run(x for x, _ in stream), stream)
        results[name] = (online, accuracy_of(adapter.predict, clean))
    return results


def test_psmt_adapts_to_a_continual_stream_and_forgets_less():
    """All adapters use test-batch BatchNorm statistics, as the official code does. The stream is short, so
    the teacher momentum is 0.9 and the learning rate high (3e-2), which makes error accumulation show
    within 450 steps. λ = 5000 instead of the official 500 because this problem's Fisher values are
    smaller (with 500, PSMT forgot less than mean teacher on 3 of 5 seeds; with 5000 on 5 of 5).
    PSMT's Fisher-weighted pull towards the source and its selective restore keep clean accuracy
    that mean teacher loses a little of and Tent loses most of."""
    runs = [continual_scenario(seed) for seed in range(3)]
    mean = {name: [sum(r[name][i] for r in runs) / len(runs) for i in (0, 1)] for name in runs[0]}
    print("\n(shifted stream / clean after) per seed 0-2, then the mean")
    for name in mean:
        cells = " ".join(f"{r[name][0]:.3f}/{r[name][1]:.3f}" for r in runs)
        print(f"{name:>16}: {cells}   mean {mean[name][0]:.3f}/{mean[name][1]:.3f}")

    for r in runs:
        assert r["psmt"][0] >= r["source model"][0] + 0.15
        assert r["psmt"][1] >= r["tent"][1] + 0.1
        assert r["psmt"][1] >= r["source model"][1] - 0.02
    assert mean["psmt"][0] >= mean["mean teacher"][0] + 0.01
    assert mean["psmt"][1] >= mean["mean teacher"][1] + 0.005


def test_selective_teacher_update_restores_low_fisher_elements():
    model = nn.Linear(4, 3)
    psmt = PSMT(model, fisher_weight=0, momentum=0.5, restore_quantile=0.25)
    source = {n: v.clone() for n, v in psmt.source_values.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
        psmt.teacher.weight.fill_(-1.0)
        psmt.teacher.bias.fill_(-1.0)
    fisher = {"weight": torch.arange(12.0).view(3, 4), "bias": torch.tensor([0.5, 20.0, 30.0])}
    psmt.update_teacher(fisher)
    threshold = quantile(torch.cat([fisher["weight"].flatten(), fisher["bias"]]), 0.25)
    for name in ("weight", "bias"):
        mask = fisher[name] < threshold
        student, teacher = getattr(model, name).detach(), getattr(psmt.teacher, name)
        assert mask.any() and (~mask).any()
        torch.testing.assert_close(student[mask], source[name][mask])
        torch.testing.assert_close(teacher[mask], source[name][mask])
        torch.testing.assert_close(teacher[~mask], 0.5 * -1.0 + 0.5 * (source[name][~mask] + 1.0))

    frozen = PSMT(nn.Linear(4, 3), fisher_weight=0, momentum=0.5, restore_quantile=0.25, teacher_mask="freeze")
    before = frozen.teacher.weight.clone()
    frozen.update_teacher({"weight": fisher["weight"], "bias": fisher["bias"]})
    mask = fisher["weight"] < threshold
    assert torch.equal(frozen.teacher.weight[mask], before[mask])


def test_psmt_without_source_takes_the_fisher_on_the_first_batch_and_uses_augment():
    data = Clusters(seed=4)
    model = train_source(data, norm=False)
    views = []

    def jitter(x):
        views.append(x)
        return x + 0.1 * torch.randn(x.shape, generator=data.gen)

    psmt = PSMT(model, augment=jitter)
    assert psmt.fisher is None
    first = data.sample(BATCH, corruption(0))[0]
    psmt.step(first)
    reference = PSMT(train_source(Clusters(seed=4), norm=False), source=[first])
    assert all(torch.equal(psmt.fisher[n], f) for n, f in reference.fisher.items())
    assert len(views) == 1 and torch.equal(views[0], first)
    with pytest.raises(peftlab.ConfigError):
        PSMT(model, teacher_mask="keep")


def test_quantile_matches_torch():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.03, 0.5, 0.97):
        torch.testing.assert_close(quantile(values, q), torch.quantile(values, q))


def test_psmt_adapts_only_a_peftlab_adapter():
    data = Clusters(seed=2)
    model = train_source(data, norm=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftlab.adapt(model, "lora", r=2, dropout=0.0, targets=["body.0", "body.3"])
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    psmt = PSMT(model, lr=1e-2, source=[data.sample(BATCH)[0]])
    for x, _ in [data.sample(BATCH, corruption(0)) for _ in range(5)]:
        psmt.step(x)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert set(psmt.params) == set(lora) and any(not torch.equal(params[n], v) for n, v in lora.items())


def test_tent_minimises_prediction_entropy():
    data = Clusters(seed=3)
    model = train_source(data, norm=False)
    stream = [data.sample(BATCH, corruption(1))[0] for _ in range(20)]

    def entropy(logits):
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()

    with torch.no_grad():
        before = entropy(model(torch.cat(stream)))
    tent = Tent(model, lr=1e-3)
    for x in stream:
        tent.step(x)
    assert entropy(tent.predict(torch.cat(stream))) < before
