"""Training steps replayed as CUDA graphs (SupervisedLoss's cuda_graphs) equal the same compiled steps without
graphs, also where a step's inputs change outside the graphs: task ids that differ between batches (a graph
that recorded them would replay the first batch's routing), and buffers that training hooks edit in place
(DyLoRA's sampled rank, TriAdaptLoRA's masks). Needs a CUDA device; on CPU inductor records no graphs."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core import api
from peftlab.core.method import TrainingStep
from peftlab.train.loss import SupervisedLoss

from .conftest import tiny_llama

TASKS = [[0, 0], [1, 1], [0, 1], [1, 0]]  # per step, one id per example
CASES = {"lora": {"r": 4}, "mtlora": {}, "divcontrol": {"learngene_r": 4, "tailors": 2, "tailor_r": 2},
         "dylora": {"r": 4}, "triadaptlora": {"reference_rank": 4}}


def compiled_steps(method: str, graphs: bool, device: str) -> tuple[list[float], list[torch.Tensor]]:
    """Losses of four SGD steps (hooks as the trainer runs them) and the trained parameters."""
    torch._dynamo.reset()
    model = peftlab.adapt(tiny_llama().to(device), method, **CASES[method]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with SupervisedLoss(model, compile_body=True, cuda_graphs=graphs) as loss_fn:
        for step, tasks in enumerate(TASKS):
            ids = torch.randint(3, 60, (2, 12), generator=generator).to(device)
            info = TrainingStep(step, len(TASKS), 0.5, 0.5)
            api.on_step(model, info)
            with peftlab.task_ids(torch.tensor(tasks, device=device)):
                total, count = loss_fn({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
                loss = total / count
                if (penalty := api.regularization(model)) is not None:
                    loss = loss + penalty
                loss.backward()
            api.before_optimizer_step(model, info)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", sorted(CASES))
def test_steps_replayed_as_cuda_graphs_equal_compiled_steps(method):
    plain_losses, plain_params = compiled_steps(method, graphs=False, device="cuda")
    losses, params = compiled_steps(method, graphs=True, device="cuda")
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for got, want in zip(params, plain_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
