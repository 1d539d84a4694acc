"""Adaptation that is not a layer or model adapter: test-time adaptation on a stream, and output-level
adaptation of frozen (black-box) models. See docs/test-time-and-black-box.md.

    from peftlab.adaptation import LAME, PSMT, CrossTune, ScoreCalibration, CoRA

    for probs in LAME(model, features=model.body).run(stream): ...      # parameter-free output correction
    for logits in PSMT(model, source=source_batches).run(stream): ...   # online mean teacher, adapts in place
    head = CrossTune(label_features); head.fit(few_shot_features, labels)   # on frozen features
    calibrated = CalibratedScorer(link_predictor, ScoreCalibration(relations=R))
    forecaster = CoRA(backbone, head, embed_dim, covariate_dims)

None of these is in the method registry: they do not attach to layers of one model (LAME corrects
outputs over a batch, PSMT runs a training procedure with a teacher copy, the others are trained
modules on top of a frozen model's forward outputs).
"""

from .blackbox import (
    CalibratedScorer,
    CoRA,
    CrossTune,
    ScoreCalibration,
    frozen_features,
    mean_pool,
    nearest_label,
)
from .tta import LAME, PSMT, Tent, call_model, fisher_information, lame_correct, use_batch_statistics

__all__ = [
    "LAME", "PSMT", "CalibratedScorer", "CoRA", "CrossTune", "ScoreCalibration", "Tent", "call_model",
    "fisher_information", "frozen_features", "lame_correct", "mean_pool", "nearest_label", "use_batch_statistics",
]
