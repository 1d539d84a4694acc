"""The speed harness runs end to end (on CPU, tiny shape): the numbers it prints are its own."""

from __future__ import annotations

import json
import math

import pytest

from peftlab.bench.speed import main

pytest.importorskip("peft")


def test_speed_harness_writes_rows_for_both_libraries(tmp_path):
    out = tmp_path / "speed-budget-0.5"  # a dot in the stem is kept
    main(["--device", "cpu", "--shapes", "tiny-llama", "--methods", "lora,dora,series", "--batch", "2",
          "--seq", "16", "--warmup", "1", "--steps", "1", "--output", str(out)])
    result = json.loads((tmp_path / "speed-budget-0.5.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["lora"]["tok_s"] > 0 and rows["lora"]["peft_tok_s"] > 0 and rows["lora"]["ratio_vs_peft"] > 0
    assert rows["dora"]["peft_tok_s"] > 0 and rows["series"]["peft_tok_s"] is None
    assert rows["series"]["step_ratio_vs_lora"] > 0 and not any(r["note"] for r in rows.values())
    assert "| lora |" in (tmp_path / "speed-budget-0.5.md").read_text()


def test_the_command_line_hands_bench_options_to_the_benchmark(capsys):
    from peftlab import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "speed", "--help"])
    assert exit_info.value.code == 0 and "--shapes" in capsys.readouterr().out


def test_cuda_graphs_without_compile_is_refused_before_any_model_is_built(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--shapes", "tiny-llama", "--cuda-graphs"])
    assert exit_info.value.code == 2 and "add --compile" in capsys.readouterr().err


def test_distributed_step_script_runs_one_process_on_the_cpu(tmp_path):
    """The 2-GPU benchmark's harness (benchmarks/distributed_step.py), in one process: a row with the losses."""
    from benchmarks import distributed_step

    out = tmp_path / "rows.jsonl"
    distributed_step.main(["--shape", "tiny-llama", "--micro", "2", "--seq", "16", "--global-micro", "2",
                           "--warmup", "1", "--steps", "2", "--device", "cpu", "--lr", "1e-2", "--output", str(out)])
    row = json.loads(out.read_text())
    assert row["world_size"] == 1 and not row["shard"] and row["tok_s"] > 0
    assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])


def test_timed_steps_run_the_methods_training_hooks_as_the_trainer_does(tmp_path, monkeypatch):
    from peftlab.bench import speed

    calls = []
    for hook in ("on_step", "regularization", "before_optimizer_step"):
        original = getattr(speed.api, hook)
        monkeypatch.setattr(speed.api, hook, lambda *a, _f=original, _h=hook: calls.append(_h) or _f(*a))
    main(["--device", "cpu", "--shapes", "tiny-llama", "--methods", "triadaptlora", "--impl", "peftlab",
          "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "2", "--output", str(tmp_path / "s")])
    assert calls == ["on_step", "regularization", "before_optimizer_step"] * 3


def test_rows_measured_before_an_interruption_are_on_disk(tmp_path, monkeypatch):
    from peftlab.bench import speed

    measure = speed.peftlab_run

    def interrupted_at_dora(model, method, *args):
        if method == "dora":
            raise KeyboardInterrupt  # what a time limit's signal leaves of the run
        return measure(model, method, *args)

    monkeypatch.setattr(speed, "peftlab_run", interrupted_at_dora)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--shapes", "tiny-llama", "--methods", "lora,dora", "--impl", "peftlab",
              "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "1", "--output", str(tmp_path / "s")])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora"] and rows[0]["tok_s"] > 0
    assert "| lora |" in (tmp_path / "s.md").read_text()
