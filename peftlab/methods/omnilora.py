"""omnilora: Omni-AVSR's three LoRA strategies for adapting one LLM to several tasks.

Cappellazzo et al. 2025, "Omni-AVSR: Towards Unified Multimodal Speech Recognition with Large
Language Models", arXiv 2511.07253. Official code read: umbertocappellazzo/Omni-AVSR, commit
7de6be273105c9dcb4932740a4dcc648b81f33cf (``Omni_AVSR/Llama_LoRA.py``: ``LoRA_config``,
``LlamaSdpaAttention_lora``; ``README.md``: the Omni-AVSR-S / -T / -ST runs). The paper trains one LLM
for ASR, VSR and AVSR (its three tasks) and compares three ways of sharing the LoRA::

    strategy="shared"       Omni-AVSR-S:   y = W0 x + s·B A x                    one LoRA for all tasks
    strategy="task"         Omni-AVSR-T:   y = W0 x + s·B_t A_t x                one LoRA per task
    strategy="shared+task"  Omni-AVSR-ST:  y = W0 x + s·(B A + B_t A_t) x        both, summed, one scale

t is the example's task. In the code the task (the modality) is fixed per forward call; here each
example carries its own id through ``peftlab.task_ids`` (the trainer sets it from the records' ``task``
field), so one batch may mix tasks (see ``mtlora.routed_update``).

Initialisation follows the code, which is the reverse of LoRA's: the down projection A starts at zero
and the up projection B Kaiming-uniform (a = √5, fan-in r), so the model is unchanged at init. No
dropout (the code has none).

Size and scale: the code sizes the rank as hidden / ``rank`` (``rank`` is a reduction factor, 32 in
every released run) and scales by ``alpha / rank`` (alpha 4): on its Llama-3.2-1B (hidden 2048) that is
rank 64 and s = 0.125. peftlab states the rank directly and scales by s = alpha / r; the defaults r 64,
alpha 8 give exactly those numbers. Targets: q and v (the code adapts only the query and value
projections; keys and output are commented out). Default strategy: "shared+task" (Omni-AVSR-ST).

Trainable parameters per adapted layer: shared r·(in + out); task T·r·(in + out); shared+task
(T + 1)·r·(in + out).

Without task ids (and no ``default_task``): "shared" needs none, "shared+task" applies the shared LoRA
only, "task" raises ConfigError. Merge: "shared" always merges; the other two fold in one selected task
(``with peftlab.task_ids(k): peftlab.merge(model)`` or ``default_task``), else MergeError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftlab.core.method import LayerAdapter, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.methods.mtlora import MultiTaskMethod, SharedTaskLoRAAdapter, TaskSelector, check_rank

STRATEGIES = ("shared", "task", "shared+task")


@register
@dataclass
class OmniLoRA(MultiTaskMethod):
    name: ClassVar[str] = "omnilora"
    family: ClassVar[str] = "multi-task"
    paper: ClassVar[str] = "Omni-AVSR (Omni-LoRA strategies), arXiv 2511.07253"
    formula: ClassVar[str] = "shared r·(in+out) | task T·r·(in+out) | shared+task (T+1)·r·(in+out)"
    mergeable: ClassVar[bool] = True  # for one selected task (any time with strategy="shared")
    identity_at_init: ClassVar[bool] = True
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v")

    strategy: str = config_field("shared+task", "shared (Omni-AVSR-S) | task (-T) | shared+task (-ST)")
    r: int = config_field(64, "rank of every LoRA (the code's hidden / 32 on Llama-3.2-1B)")
    alpha: float = config_field(8.0, "scale numerator: s = alpha / r")

    def validate(self) -> None:
        super().validate()
        check(self.strategy in STRATEGIES, self.name, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        check_positive_ints(self, "r")

    @property
    def shared(self) -> bool:
        return self.strategy in ("shared", "shared+task")

    @property
    def per_task(self) -> bool:
        return self.strategy in ("task", "shared+task")

    def build(self, site: Site) -> LayerAdapter:
        check_rank(self.name, self.r, site)
        scale = self.alpha / self.r
        return SharedTaskLoRAAdapter(site, TaskSelector(self), shared_r=self.r if self.shared else 0,
                                     task_r=self.r if self.per_task else 0, shared_scale=scale, task_scale=scale,
                                     dropout=0.0, zero_side="A")

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        copies = int(self.shared) + (self.num_tasks if self.per_task else 0)
        return copies * self.r * (in_features + out_features)
