"""MTLoRA: a shared TA-LoRA plus one TS-LoRA per task, routed per example by ``peftlab.task_ids``.

Also holds the multi-task checks the other multi-task methods (omnilora, polyhistor, divcontrol)
reuse: the two-opposite-tasks toy, mixed-batch routing and the trainer with a ``task`` field.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import peftlab
from peftlab.core import api
from peftlab.train.data import collate, load_examples, tokenize
from peftlab.train.loop import TrainArgs, train

from ..conftest import char_tokenizer, make_inputs, output_of, tiny_llama

CASES = {"mtlora": {"r": 2, "task_r": 2, "tasks": 3, "default_task": 0}}
VARIANTS = [("mtlora", {"r": 2, "task_r": 3, "tasks": ["x", "y"], "default_task": "y", "dropout": 0.0,
                        "targets": "all-linear"})]

WIDTH = 16


# --------------------------------------------------------------------------------------------------
# Shared multi-task checks


def opposite_tasks(n: int = 64, seed: int = 0):
    """Inputs, task ids and a rank-2 D: task 0 needs W0 + D, task 1 needs W0 − D; every input appears
    once per task, so the best task-blind update is exactly ΔW = 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n // 2, WIDTH, generator=gen).repeat_interleave(2, dim=0)
    d = torch.randn(WIDTH, 2, generator=gen) @ torch.randn(2, WIDTH, generator=gen) / WIDTH**0.5
    ids = torch.arange(n) % 2
    return x, ids, d


def fit_opposite_tasks(method: str, steps: int = 300, lr: float = 1e-2, **options) -> dict[str, float]:
    """Train ``method`` on one 16 x 16 linear layer for both tasks at once (mixed batches).

    A task-blind update can do no better than ΔW = 0, i.e. the initial loss."""
    x, ids, d = opposite_tasks()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    sign = (1 - 2 * ids).float()[:, None]
    with torch.no_grad():
        target = model(x) + sign * (x @ d.T)
    peftlab.adapt(model, method, targets=["0"], **options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)

    def loss_per_task() -> torch.Tensor:
        with peftlab.task_ids(ids):
            errors = (model(x) - target).pow(2).mean(dim=1)
        return torch.stack([errors[ids == t].mean() for t in (0, 1)])

    with torch.no_grad():
        initial = loss_per_task().mean().item()
    for _ in range(steps):
        loss = loss_per_task().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_per_task()
    return {"initial": initial, "final": final.mean().item(), "task0": final[0].item(), "task1": final[1].item(),
            "model": model}


def perturbed(method: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = peftlab.adapt(tiny_llama(), method, **options)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def check_routing_is_per_example(method: str, **options) -> float:
    """Rows of a mixed batch equal the same rows run as pure batches; tasks give different outputs.
    Returns the smallest max-difference between two tasks' outputs."""
    model = perturbed(method, **options)
    inputs = make_inputs("llama", batch=4, length=7)
    mixed_ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), peftlab.task_ids(mixed_ids):
        mixed = output_of(model, inputs)
    pure = {}
    for task in (0, 1):
        with torch.no_grad(), peftlab.task_ids(task):
            pure[task] = output_of(model, inputs)
    for row, task in enumerate(mixed_ids.tolist()):
        assert torch.allclose(mixed[row], pure[task][row], atol=1e-5), (row, task)
    return min((pure[0][row] - pure[1][row]).abs().max().item() for row in range(4))


def check_merge_needs_one_task(method: str, **options) -> None:
    model = perturbed(method, **options)
    inputs = make_inputs("llama")
    with pytest.raises(peftlab.MergeError, match="one task"):
        with peftlab.task_ids([0, 1]):
            peftlab.merge(model)
    assert "default" in peftlab.adapters(model)
    with torch.no_grad(), peftlab.task_ids(1):
        task1 = output_of(model, inputs)
        peftlab.merge(model)
    assert not peftlab.adapters(model)
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), task1, atol=1e-4)


# Routes of a batch of 3: no ids; one task as an int and as one id per example; mixed tasks
ROUTES = (None, 1, [1, 1, 1], [2, 0, 1])


def check_against_reference(method: str, reference, routes=ROUTES, setup=None, compiled=False, **options) -> None:
    """Output and gradients (wrt x and every trainable parameter) of one adapted 12 -> 10 linear layer
    equal ``reference(adapter, layer, params, x, ids)`` computed in float64 on copies (ids: one per
    example, or None), for every route, with and without a sequence dimension. A parameter the
    reference never touches (another task's factors) must get no gradient or an exact zero.
    ``compiled``: run the model through torch.compile in one graph (fullgraph), traced once per input
    shape whatever the route."""
    torch.manual_seed(0)
    model = peftlab.adapt(nn.Sequential(nn.Linear(12, 10)), method, targets=["0"], **options)
    run = model
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        run = torch.compile(model, backend="aot_eager", fullgraph=True)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    if setup is not None:
        setup(adapter)
    params = dict(adapter.named_parameters())
    for shape in ((3, 4, 12), (3, 12)):
        for route in routes:
            x = torch.randn(shape, generator=gen, requires_grad=True)
            grad = torch.randn(shape[:-1] + (10,), generator=gen)
            with contextlib.nullcontext() if route is None else peftlab.task_ids(route):
                got = run(x)
            got.backward(grad)
            copies = {name: p.detach().double().requires_grad_() for name, p in params.items()}
            x64 = x.detach().double().requires_grad_()
            ids = None if route is None else torch.as_tensor(route).expand(3)
            expected = reference(adapter, layer, copies, x64, ids)
            expected.backward(grad.double())
            where = f"{method} {options}, input {shape}, task ids {route}"
            _close(got, expected, where)
            _close(x.grad, x64.grad, f"{where}, grad x")
            for name, p in params.items():
                want = copies[name].grad
                if want is None:  # not in this batch's function: no gradient, or exact zeros
                    assert p.grad is None or not p.grad.any(), f"{where}, grad {name}"
                else:
                    _close(p.grad, want, f"{where}, grad {name}")
                p.grad = None
    if compiled:
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one per input shape


def _close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: {m}")


def compiled_block_graphs(method: str, **options) -> int:
    """Graphs dynamo makes over three training steps of a tiny Llama whose decoder blocks are compiled
    as ``SupervisedLoss(compile_body=True)`` compiles them, but in one graph each (fullgraph: a graph
    break raises) and with the cheap aot_eager backend; the task changes every step (default task,
    one task, a mix)."""
    from peftlab.core.hf import repeated_blocks
    from peftlab.train.loss import SupervisedLoss

    torch._dynamo.reset()
    counters.clear()
    model = peftlab.adapt(tiny_llama(), method, **options).train()
    loss_fn = SupervisedLoss(model)
    blocks = repeated_blocks(loss_fn.body)
    for block in blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    inputs = make_inputs("llama", batch=2)
    batch = {**inputs, "labels": inputs["input_ids"]}
    try:
        for ids in (None, 1, [1, 0]):
            with contextlib.nullcontext() if ids is None else peftlab.task_ids(ids):
                total, count = loss_fn(batch)
            (total / count).backward()
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    return counters["stats"]["unique_graphs"]


def sync_and_gather_ops(method: str, ids=None, **options) -> set[str]:
    """The device-sync and gather ATen ops one training step of an adapted 12 -> 10 linear layer
    dispatches (after a warm-up step, which resolves the task ids)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    watched = {"_local_scalar_dense", "index", "index_select", "gather", "one_hot", "aminmax",
               "repeat_interleave", "nonzero"}
    seen = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().split("::")[-1].split(".")[0] in watched:
                seen.add(func.name())
            return func(*args, **(kwargs or {}))

    model = peftlab.adapt(nn.Sequential(nn.Linear(12, 10)), method, targets=["0"], **options).train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    with contextlib.nullcontext() if ids is None else peftlab.task_ids(ids):
        model(x).sum().backward()
        with Watch():
            model(x).sum().backward()
    return seen


def write_task_records(path, n: int = 32):
    """Two tasks, same instructions, opposite constant answers: only the task id tells them apart."""
    records = [{"instruction": f"item {i // 2}", "output": "aaaa" if i % 2 == 0 else "zzzz",
                "task": "first" if i % 2 == 0 else "second"} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def train_with_task_field(tmp_path, method: str, options: dict, steps: int = 30, lr: float = 3e-2):
    """Train through the trainer on records carrying ``task``, reload, and score each record's loss
    with its own task id and with the other task's id. Returns (model, (own loss, swapped loss))."""
    data = write_task_records(tmp_path / "tasks.json")
    args = TrainArgs(model="tiny", data=str(data), output=str(tmp_path / "run"), method=method,
                     method_options=options, max_steps=steps, batch_size=8, micro_batch_size=4, lr=lr,
                     warmup_steps=2, cutoff_len=32, template="plain", log_every=5, save_every=0)
    torch.manual_seed(0)
    train(args, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False)
    model = peftlab.load(tiny_llama(), tmp_path / "run")
    assert peftlab.adapters(model)["default"].task_names == ("first", "second")  # filled in by the trainer
    tokenizer = char_tokenizer()
    sequences = tokenize(load_examples(data, "plain", tokenizer), tokenizer, cutoff_len=32)
    batch = collate(sequences, tokenizer.pad_token_id, ["first", "second"])
    ids = batch.pop("task_ids")
    with torch.no_grad(), peftlab.disabled(model):
        losses = [model(**batch).loss.item()]
    with torch.no_grad():
        for chosen in (ids, 1 - ids):
            with peftlab.task_ids(chosen):
                losses.append(model(**batch).loss.item())
    return model, tuple(losses)


@pytest.mark.parametrize("method, options", [("mtlora", {"r": 4, "dropout": 0.0}),
                                             ("omnilora", {"strategy": "task", "r": 4})])
def test_checkpointed_blocks_see_the_task_ids_again_when_backward_recomputes_them(tmp_path, method, options):
    """Gradient checkpointing reruns each block's forward inside backward: the batch's task ids must still be
    set there, or the recomputed route differs (silently wrong gradients, or no ids at all)."""
    data = write_task_records(tmp_path / "tasks.json", n=16)
    trained = []
    for checkpointing in (False, True):
        args = TrainArgs(model="tiny", data=str(data), output=str(tmp_path / f"run{checkpointing}"), method=method,
                         method_options=options, max_steps=2, batch_size=8, micro_batch_size=4, lr=1e-2,
                         warmup_steps=0, cutoff_len=32, template="plain", save_every=0,
                         gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = tiny_llama()
        train(args, model=model, tokenizer=char_tokenizer(), progress=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, msg=name)


# --------------------------------------------------------------------------------------------------
# MTLoRA


def test_two_opposite_tasks_need_the_task_specific_part():
    shared = fit_opposite_tasks("lora", r=4, dropout=0.0)
    multi = fit_opposite_tasks("mtlora", r=4, task_r=2, tasks=2, dropout=0.0, shared_scale=1.0, task_scale=1.0)
    print(f"\nopposite tasks, MSE: start {shared['initial']:.4f}; lora r4 {shared['final']:.4f}; "
          f"mtlora {multi['final']:.6f} (task0 {multi['task0']:.6f}, task1 {multi['task1']:.6f})")
    assert shared["final"] > 0.9 * shared["initial"]  # a task-blind update cannot move
    assert multi["final"] < 0.01 * multi["initial"]
    assert max(multi["task0"], multi["task1"]) < 0.02 * multi["initial"]


def test_forward_is_the_formula_per_example():
    model = perturbed("mtlora", r=2, task_r=3, tasks=3, dropout=0.0, shared_scale=0.5, task_scale=1.5)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    x = torch.randn(3, 4, layer.in_features)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), peftlab.task_ids(ids):
        got = layer(x)
    with torch.no_grad():
        base = nn.functional.linear(x, layer.weight, layer.bias)
        shared = 0.5 * x @ adapter.shared_A.T @ adapter.shared_B.T
        for b, t in enumerate(ids.tolist()):
            task = 1.5 * x[b] @ adapter.task_A[t].T @ adapter.task_B[:, t].T
            assert torch.allclose(got[b], base[b] + shared[b] + task, atol=1e-5)
        assert torch.allclose(layer(x), base + shared, atol=1e-5)  # no task ids: TA-LoRA only
    assert adapter.task_A.shape == (3, 3, layer.in_features) and adapter.task_B.shape == (layer.out_features, 3, 3)


def test_init_is_the_base_for_every_task():
    model, inputs = tiny_llama(), make_inputs("llama", batch=3)
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "mtlora", tasks=3)
    with torch.no_grad(), peftlab.task_ids([0, 1, 2]):
        assert torch.allclose(output_of(model, inputs), base, atol=1e-6)


def test_mixed_batches_route_each_example_to_its_task():
    gap = check_routing_is_per_example("mtlora", r=2, task_r=2, tasks=2, dropout=0.0)
    assert gap > 1e-3


def test_merge_folds_one_selected_task():
    check_merge_needs_one_task("mtlora", r=2, task_r=2, tasks=2)
    model = perturbed("mtlora", r=2, task_r=2, tasks=2)
    with pytest.raises(peftlab.MergeError, match="select it"):  # no task selected
        peftlab.merge(model)


def test_task_ids_are_checked():
    model = perturbed("mtlora", r=2, task_r=2, tasks=2)
    inputs = make_inputs("llama", batch=2)
    with pytest.raises(peftlab.ConfigError, match=r"\[0, 2\)"):
        with peftlab.task_ids([0, 2]):
            output_of(model, inputs)
    with pytest.raises(peftlab.ConfigError, match="3 task ids for a batch of 2"):
        with peftlab.task_ids([0, 1, 1]):
            output_of(model, inputs)


def test_an_id_tensor_edited_in_place_is_read_again():
    model, inputs = perturbed("mtlora", r=2, task_r=2, tasks=2), make_inputs("llama")
    ids = torch.tensor([0, 0])
    with torch.no_grad(), peftlab.task_ids(ids):
        first = output_of(model, inputs)
        ids[1] = 1
        edited = output_of(model, inputs)
    assert torch.allclose(edited[0], first[0]) and not torch.allclose(edited[1], first[1], atol=1e-4)


def test_options_tasks_and_default_task():
    config = peftlab.MTLoRA(tasks=["math", "code"], default_task="code")
    assert config.num_tasks == 2 and config.default_task_index == 1
    assert peftlab.MTLoRA.from_options(config.options()).tasks == ("math", "code")
    for bad in ({"tasks": 0}, {"tasks": []}, {"tasks": ["a", "a"]}, {"tasks": 2, "default_task": 2},
                {"tasks": ["a"], "default_task": "b"}, {"r": 0}, {"dropout": 1.0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.MTLoRA(**bad)
    assert peftlab.MTLoRA(tasks=3).trainable_count(4096, 4096) == (8 + 3 * 8) * 8192


def test_trainer_fills_tasks_from_the_data_and_each_task_learns_its_answer(tmp_path):
    model, (base, own, swapped) = train_with_task_field(tmp_path, "mtlora", {"r": 4, "task_r": 4})
    print(f"\nmtlora trainer: loss base {base:.4f}, with own task id {own:.4f}, other task's id {swapped:.4f}")
    assert own < swapped - 0.3 and own < base - 0.3
    inputs = make_inputs("llama")
    with torch.no_grad():
        outputs = []
        for task in (0, 1):
            with peftlab.task_ids(task):
                outputs.append(output_of(model, inputs))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)


def shared_task_reference(adapter, layer, p, x, ids, mask=None):
    """y_b = W0 x_b + b + s_sh·B_sh A_sh h_b + s_t·B_t A_t h_b, h = x ⊙ mask, one example at a time."""
    h = x if mask is None else x * mask.double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    y = nn.functional.linear(x, layer.weight.detach().double(), bias)
    if "shared_A" in p:
        y = y + adapter.shared_scale * h @ p["shared_A"].T @ p["shared_B"].T
    if ids is None or "task_A" not in p:
        return y
    task = [adapter.task_scale * h[b] @ p["task_A"][t].T @ p["task_B"][:, t].T for b, t in enumerate(ids.tolist())]
    return y + torch.stack(task)


class FixedMask(nn.Module):
    """A dropout stand-in with a known mask, so the reference can apply the same one."""

    def __init__(self, width: int):
        super().__init__()
        self.mask = (torch.rand(width, generator=torch.Generator().manual_seed(3)) > 0.3).float() / 0.7

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("method, options", [
    ("mtlora", {"r": 2, "task_r": 3, "tasks": 3, "shared_scale": 0.5, "task_scale": 1.5, "dropout": 0.0}),
    ("omnilora", {"strategy": "shared+task", "r": 2, "alpha": 3.0, "tasks": 3}),
    ("omnilora", {"strategy": "task", "r": 3, "alpha": 1.0, "tasks": 3}),
])
def test_fast_paths_match_the_reference_formula(method, options):
    routes = ROUTES[1:] if options.get("strategy") == "task" else ROUTES  # no task-agnostic part: ids needed
    check_against_reference(method, shared_task_reference, routes, **options)


def test_dropout_reaches_the_adapter_input_only():
    mask = FixedMask(12)

    def setup(adapter):
        assert isinstance(adapter.dropout, nn.Dropout)
        adapter.dropout = mask

    def reference(adapter, layer, p, x, ids):
        return shared_task_reference(adapter, layer, p, x, ids, mask.mask)

    check_against_reference("mtlora", reference, setup=setup, r=2, task_r=2, tasks=3, dropout=0.3)


def test_selector_tells_one_task_batches_from_mixed_ones():
    model = perturbed("mtlora", r=2, task_r=2, tasks=3, default_task=2)
    selector = next(iter(api.attached_adapters(model, "default").values())).selector
    x = torch.zeros(3, 5, 4)
    assert selector.route(x) == 2  # default_task
    for ids, want in ((1, 1), ([0, 0, 0], 0), (torch.tensor([1, 1, 1], dtype=torch.int32), 1)):
        with peftlab.task_ids(ids):
            assert selector.route(x) == want and isinstance(selector.route(x), int)
            assert selector.for_batch(x).tolist() == [want] * 3
    with peftlab.task_ids([0, 2, 0]):
        assert selector.route(x).tolist() == [0, 2, 0]
    no_default = perturbed("mtlora", r=2, task_r=2, tasks=3)
    assert next(iter(api.attached_adapters(no_default, "default").values())).selector.route(x) is None


def test_a_one_task_step_makes_no_gather_and_no_sync():
    options = {"r": 2, "task_r": 2, "tasks": 3, "default_task": 1}
    assert sync_and_gather_ops("mtlora", **options) == set()
    assert sync_and_gather_ops("mtlora", [2, 2], **options) == set()
    assert sync_and_gather_ops("mtlora", [0, 2], **options) == {"aten::index.Tensor"}  # the coefficient rows


@pytest.mark.parametrize("method, options", [
    ("mtlora", {"r": 2, "task_r": 3, "tasks": 3, "shared_scale": 0.5, "task_scale": 1.5, "dropout": 0.0}),
    ("omnilora", {"strategy": "task", "r": 3, "alpha": 1.0, "tasks": 3}),
])
def test_compiled_forward_is_one_graph_for_every_route(method, options):
    """Dynamo cannot read the task ids' context variable: they reach compiled code through an op, with
    no branch on them, so a change of task neither breaks the graph nor recompiles it."""
    routes = ROUTES[1:] if options.get("strategy") == "task" else ROUTES
    check_against_reference(method, shared_task_reference, routes, compiled=True, **options)


def test_compiled_blocks_have_no_graph_break_and_one_graph_for_every_layer_and_task():
    # two graphs: the first block's input (from the frozen embedding) needs no gradient, the others' do
    assert compiled_block_graphs("mtlora", r=2, task_r=2, tasks=2, default_task=0) == 2


def test_compiled_adapter_without_a_shared_part_still_needs_task_ids():
    torch._dynamo.reset()
    model = peftlab.adapt(nn.Sequential(nn.Linear(12, 10)), "omnilora", targets=["0"], strategy="task", r=3, tasks=3)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 12)
    with peftlab.task_ids(1):
        run(x)
    with pytest.raises(peftlab.ConfigError, match="needs task ids"):
        run(x)
