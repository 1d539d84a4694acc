"""Data pipeline, loss, and the training loop: checkpoints, resume, interruption, NaN."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import torch

import peftlab
from peftlab.core.hf import forces_input_grads
from peftlab.train import checkpoint
from peftlab.train.data import (
    IGNORE,
    DataError,
    collate,
    collate_packed,
    epoch_batches,
    load_examples,
    pack,
    tokenize,
)
from peftlab.train.loop import TrainArgs, Trainer, TrainingError, train
from peftlab.train.loss import SupervisedLoss
from peftlab.train.templates import Example, to_example

from .conftest import char_tokenizer, lora_llama, tiny_llama


def write_data(path, n=48):
    records = [{"instruction": f"add {a} {b}", "input": "", "output": f"{a + b}", "answer": str(a + b)}
               for a in range(8) for b in range(6)][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def args_for(tmp_path, **overrides):
    settings = dict(model="tiny", data=str(write_data(tmp_path / "data.json")), output=str(tmp_path / "run"),
                    method="lora", method_options={"r": 4, "dropout": 0.1}, max_steps=8, batch_size=4,
                    micro_batch_size=2, lr=1e-2, warmup_steps=1, cutoff_len=48, template="plain", log_every=1,
                    save_every=2)
    return TrainArgs(**{**settings, **overrides})


def run(args, **kwargs):
    torch.manual_seed(0)
    return train(args, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False, **kwargs)


def losses(output) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# -------------------------------------------------------------------------------------------- data


def test_tokenize_masks_the_prompt_and_appends_eos():
    tokenizer = char_tokenizer()
    [seq] = tokenize([Example("ab\n", "cd", None, 0)], tokenizer, cutoff_len=32)
    assert seq.input_ids == [*tokenizer("ab\ncd")["input_ids"], tokenizer.eos_token_id]
    assert seq.labels == [IGNORE] * 3 + seq.input_ids[3:]
    [seq] = tokenize([Example("ab\n", "cd", None, 0)], tokenizer, cutoff_len=32, train_on_inputs=True)
    assert seq.labels == seq.input_ids


def test_overlong_records_are_truncated_dropped_or_named():
    tokenizer = char_tokenizer()
    examples = [Example("ab\n", "cdefgh", None, 0), Example("x\n", "y", None, 1)]
    truncated = tokenize(examples, tokenizer, cutoff_len=5)
    assert len(truncated[0]) == 5 and truncated[0].input_ids[-1] != tokenizer.eos_token_id
    assert [s.index for s in tokenize(examples, tokenizer, cutoff_len=5, overlong="drop")] == [1]
    with pytest.raises(DataError, match="record 0 is 10 tokens"):
        tokenize(examples, tokenizer, cutoff_len=5, overlong="error")
    with pytest.raises(DataError, match="record 0 .*prompt 3"):
        tokenize([Example("ab\n", "c", None, 0)], tokenizer, cutoff_len=3)


def test_bad_records_are_named(tmp_path):
    with pytest.raises(DataError, match="record 1 has none of instruction"):
        (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"question": "x"}]))
        load_examples(tmp_path / "d.json")
    with pytest.raises(DataError, match="is empty"):
        (tmp_path / "e.json").write_text("")
        load_examples(tmp_path / "e.json")
    with pytest.raises(DataError, match="no chat template"):
        to_example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 0,
                   tokenizer=char_tokenizer())


def test_templates_render_llm_adapters_prompts():
    prompt = to_example({"instruction": "Q", "input": "ctx", "output": "A"}, 0).prompt
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith("### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:\n")


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [5, 9, 2, 7, 7, 3, 8, 1, 4]
    first = epoch_batches(lengths, 2, seed=3, epoch=1)
    assert first == epoch_batches(lengths, 2, seed=3, epoch=1) != epoch_batches(lengths, 2, seed=3, epoch=2)
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))


def test_packed_batches_give_the_unpacked_loss():
    model, tokenizer = tiny_llama(), char_tokenizer()
    examples = [Example("a+b\n", "ab", None, 0), Example("xyz\n", "q", None, 1), Example("k\n", "lmno", None, 2)]
    sequences = tokenize(examples, tokenizer, cutoff_len=32)
    loss_fn = SupervisedLoss(model)
    with torch.no_grad():
        plain, n_plain = loss_fn(collate(sequences, 0))
        packed, n_packed = loss_fn(collate_packed(pack(sequences, 32), 0, torch.float32))
    assert n_plain == n_packed and torch.allclose(plain, packed, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the count's copy behind the GPU's queue needs CUDA"))])
def test_fused_loss_equals_the_models_own_loss(device):
    model, tokenizer = tiny_llama().to(device), char_tokenizer()
    sequences = tokenize([Example("ab\n", "cde", None, 0), Example("x\n", "yz", None, 1)], tokenizer, cutoff_len=32)
    batch = {k: v.to(device) for k, v in collate(sequences, 0).items()}
    loss_fn = SupervisedLoss(model, chunk_tokens=2)
    assert loss_fn.fused and loss_fn.verify(batch)
    with torch.no_grad():
        total, count = loss_fn(batch)
        reference = model(**batch).loss
    assert torch.allclose(total / count, reference, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_loss_drops_the_embeddings_grad_hook_unless_checkpointing_is_reentrant(reentrant):
    model = lora_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.arange(3, 19).view(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    adapters = [p for p in model.parameters() if p.requires_grad]

    def gradients(loss):  # .backward: reentrant checkpointing does not support autograd.grad
        loss.backward()
        grads = [p.grad for p in adapters]
        model.zero_grad(set_to_none=True)
        return grads

    expected = gradients(model(**batch).loss)  # transformers' hook in place
    embeddings_require_grad = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: embeddings_require_grad.append(
        out.requires_grad))
    with SupervisedLoss(model) as loss_fn:
        total, count = loss_fn(batch)
        got = gradients(total / count)
    assert embeddings_require_grad == [reentrant]
    assert forces_input_grads(model)  # handed back as it came
    assert all(g is not None for g in expected)
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want)


# -------------------------------------------------------------------------------------------- loop


def test_training_lowers_the_loss_and_writes_everything(tmp_path):
    result = run(args_for(tmp_path, max_steps=30, save_every=0, val_size=8, lr=3e-2, method_options={"r": 4}))
    out = tmp_path / "run"
    steps = losses(out)
    first, last = sum(steps[s] for s in (1, 2, 3)) / 3, sum(steps[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.1, steps  # a frozen random tiny model: a small but real drop
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "train_config.json",
            "loss.png"} <= {p.name for p in out.iterdir()}
    assert result.val_loss is not None and result.steps == 30
    model = peftlab.load(tiny_llama(), out)
    assert peftlab.adapters(model)["default"].r == 4


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    run(args_for(tmp_path / "a"))  # the reference, uninterrupted; dropout on, so RNG state matters
    reference = losses(tmp_path / "a" / "run")

    original = Trainer._step

    def dies_at_step_5(self, batches, loss_fn, step):
        if step == 5:
            raise KeyboardInterrupt  # a hard kill: no chance to save
        return original(self, batches, loss_fn, step)

    monkeypatch.setattr(Trainer, "_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(args_for(tmp_path / "b"))
    monkeypatch.setattr(Trainer, "_step", original)
    assert checkpoint.latest(tmp_path / "b" / "run" / "checkpoints").name == "step-00000004"
    run(args_for(tmp_path / "b", resume=True))
    resumed = losses(tmp_path / "b" / "run")
    assert resumed == reference


def test_sigint_saves_a_checkpoint_at_the_step_boundary(tmp_path, monkeypatch):
    original = peftlab.core.api.on_step

    def interrupt_at_3(model, step):
        if step.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        original(model, step)

    monkeypatch.setattr(peftlab.core.api, "on_step", interrupt_at_3)
    with pytest.raises(TrainingError, match="interrupted; checkpoint .*step-00000004.* --resume"):
        run(args_for(tmp_path, save_every=0))
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / checkpoint.STATE_FILE).is_file()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = Trainer._step

    def nan_at_step_3(self, batches, loss_fn, step):
        if step == 3:
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data.fill_(float("nan"))
        return original(self, batches, loss_fn, step)

    monkeypatch.setattr(Trainer, "_step", nan_at_step_3)
    with pytest.raises(TrainingError, match="non-finite at step 4.*step-00000002.*lower learning rate"):
        run(args_for(tmp_path))


def test_resume_refuses_changed_settings(tmp_path):
    run(args_for(tmp_path))
    with pytest.raises(TrainingError, match="cannot resume: batch_size"):
        run(args_for(tmp_path, batch_size=8, resume=True))
    with pytest.raises(TrainingError, match="no checkpoint"):
        run(args_for(tmp_path / "fresh", resume=True))


def test_method_hooks_are_called_in_order(tmp_path, monkeypatch):
    calls = []
    config_class = peftlab.method_class("lora")
    monkeypatch.setattr(config_class, "on_step", lambda self, adapters, step: calls.append(("step", step.step)),
                        raising=False)
    monkeypatch.setattr(config_class, "before_optimizer_step",
                        lambda self, adapters, step: calls.append(("update", step.step)), raising=False)
    run(args_for(tmp_path, max_steps=2, save_every=0))
    assert calls == [("step", 0), ("update", 0), ("step", 1), ("update", 1)]


def test_stacked_methods_train_together_and_reload_as_a_stack(tmp_path):
    options = {"prompt": {"num_virtual_tokens": 2}, "lora": {"r": 2}}
    run(args_for(tmp_path, method="prompt+lora", method_options=options, max_steps=3))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoints", "lora", "prompt"]
    model = peftlab.load(tiny_llama(), out)
    assert peftlab.active(model) == ["prompt", "lora"]
    assert {c.name for c in peftlab.adapters(model).values()} == {"prompt", "lora"}


def test_compiling_marks_each_decoder_block_and_release_restores_eager():
    model = tiny_llama()
    loss_fn = SupervisedLoss(model, compile_body=True)
    blocks = list(model.model.layers)
    assert [b.module for b in loss_fn.compiled] == blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert model.model._compiled_call_impl is None  # the body itself stays eager: blocks are the unit
    loss_fn.release()
    assert all(b._compiled_call_impl is None for b in blocks) and loss_fn.compiled == []


def _body_step(checkpointed: bool, compiled: bool):
    """One body forward and backward of a tiny LoRA Llama: (non-parameter tensors saved for backward, backward
    FLOPs, adapter gradients). 16 tokens: below the fold's threshold, so every matmul is one the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    torch._dynamo.reset()
    model = lora_llama(checkpointed)
    loss_fn = SupervisedLoss(model, compile_body=compiled)
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in weights:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=torch.arange(3, 19).view(1, 16), use_cache=False).last_hidden_state
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1), dtype=hidden.dtype)
    with FlopCounterMode(display=False) as flops:
        (hidden * probe).sum().backward()  # not sum(h²): the final norm makes that nearly scale-invariant
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(b.module.gradient_checkpointing is False for b in loss_fn.compiled)
    loss_fn.release()
    assert all(layer.gradient_checkpointing is checkpointed for layer in model.model.layers)  # handed back as it came
    return saved, flops.get_total_flops(), grads


def test_compiled_checkpointed_blocks_keep_only_inputs_and_recompute_only_what_backward_reads(partitioned_compile):
    _, plain_flops, expected = _body_step(checkpointed=False, compiled=False)
    _, eager_flops, _ = _body_step(checkpointed=True, compiled=False)
    saved, compiled_flops, grads = _body_step(checkpointed=True, compiled=True)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    # Kept: hidden states, rotary tables, norm statistics; not the per-head or MLP-width activations.
    assert saved and all(len(shape) == 3 and shape[-1] in (1, 8, 32) for shape in saved)
    # Eager checkpointing reruns all of each block; compiled, the down projection (its product only feeds
    # the residual sum, which backward never reads) is skipped: 2 layers x 2 x 16 tokens x 48 x 32.
    assert eager_flops - compiled_flops == 2 * 2 * 16 * 48 * 32
    assert compiled_flops > plain_flops


def test_compiled_checkpointed_training_equals_plain_training_and_hands_the_model_back(tmp_path, partitioned_compile):
    trained = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_llama()
        args = args_for(tmp_path / str(compiled), method_options={"r": 4, "dropout": 0.0}, max_steps=2, save_every=0,
                        compile=compiled, gradient_checkpointing=compiled)
        torch._dynamo.reset()
        train(args, model=model, tokenizer=char_tokenizer(), progress=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(b._compiled_call_impl is None for b in model.model.layers)
        assert all(b.gradient_checkpointing is compiled for b in model.model.layers)
    for name, value in trained[0].items():  # fp32: the compiled graph sums in another order
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failed_compiled_run_still_hands_the_model_back(tmp_path, monkeypatch):
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="eager"))
    step = Trainer._step

    def poisoned(self, batches, loss_fn, index):
        for param in self.model.parameters():
            if param.requires_grad:
                param.data.fill_(float("nan"))
        return step(self, batches, loss_fn, index)

    monkeypatch.setattr(Trainer, "_step", poisoned)
    model = tiny_llama()
    with pytest.raises(TrainingError, match="non-finite"):
        train(args_for(tmp_path, compile=True, gradient_checkpointing=True), model=model,
              tokenizer=char_tokenizer(), progress=False)
    assert all(b._compiled_call_impl is None and b.gradient_checkpointing for b in model.model.layers)


def test_activation_budget_needs_compile_and_a_share():
    with pytest.raises(peftlab.PeftlabError, match="needs compile"):
        TrainArgs(model="m", data="d", output="o", activation_budget=0.2).validate()
    with pytest.raises(peftlab.PeftlabError, match=r"in \[0, 1\]"):
        TrainArgs(model="m", data="d", output="o", compile=True, activation_budget=1.5).validate()
    TrainArgs(model="m", data="d", output="o", compile=True, activation_budget=0.0).validate()


def test_config_file_numbers_written_without_a_dot_are_numbers(tmp_path):
    from peftlab import cli

    (tmp_path / "run.yaml").write_text("lr: 3e-4\nepochs: 2\nwarmup_steps: '5'\n")
    ns = cli.build_parser().parse_args(["train", "--model", "m", "--data", "d.json", "--output", "o",
                                        "--config", str(tmp_path / "run.yaml")])
    args = cli.train_args(ns)
    assert args.lr == 3e-4 and args.warmup_steps == 5 and args.epochs == 2
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    ns.config = str(tmp_path / "bad.yaml")
    with pytest.raises(peftlab.PeftlabError, match="lr must be a number"):
        cli.train_args(ns)


def test_cuda_graphs_need_compile_and_no_offload():
    for settings in ({}, {"compile": True, "offload_activations": True}):
        with pytest.raises(peftlab.PeftlabError, match="cuda_graphs"):
            TrainArgs(model="m", data="d", output="o", cuda_graphs=True, **settings).validate()
    with pytest.raises(peftlab.PeftlabError, match="needs compile"):
        SupervisedLoss(tiny_llama(), cuda_graphs=True)


@pytest.mark.parametrize("packing", [False, True])
def test_cuda_graph_training_pads_to_the_longest_row_marks_each_micro_batch_and_equals_plain_training(
        tmp_path, monkeypatch, packing):
    """On CPU inductor runs no graphs (the trainer warns): what is left to check is the trainer's side. Every
    batch has one width, the data's longest row, however far below the cutoff that is."""
    modes, widths, marks = [], [], []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: modes.append(kw.get("mode")) or original(self, backend="eager"))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    call = SupervisedLoss.__call__
    monkeypatch.setattr(SupervisedLoss, "__call__",
                        lambda self, batch: widths.append(batch["input_ids"].shape[1]) or call(self, batch))
    trained = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = tiny_llama()
        args = args_for(tmp_path / str(graphs), method_options={"r": 4, "dropout": 0.0}, max_steps=2,
                        save_every=0, compile=True, cuda_graphs=graphs, packing=packing,
                        cutoff_len=48 if packing else 512)  # packed rows fill the cutoff
        with pytest.warns(UserWarning, match="not on a CUDA device") if graphs else contextlib.nullcontext():
            train(args, model=model, tokenizer=char_tokenizer(), progress=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if not graphs:
            assert not marks
            plain_calls, plain_widths, widths[:] = len(widths), list(widths), []
    longest = longest_row(args, packing)
    assert set(modes) == {None, "reduce-overhead"} and set(widths) == {longest}
    assert min(plain_widths) < longest  # else padding to one width would show nothing
    assert packing or longest < args.cutoff_len / 4  # the cutoff is not what sets the width
    assert len(marks) == plain_calls == 2 + 2 * 2  # verify's two forwards, then 2 steps of 2 micro-batches
    for name, value in trained[0].items():  # Adam magnifies the padded attention's rounding in tiny gradients
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def longest_row(args: TrainArgs, packing: bool) -> int:
    """The longest row the data makes, the same way as the trainer, but written out here."""
    sequences = tokenize(load_examples(args.data, args.template, char_tokenizer()), char_tokenizer(),
                         cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs)
    rows = pack(sequences, args.cutoff_len) if packing else [[s] for s in sequences]
    return max(sum(len(s) for s in row) for row in rows)
