"""SPP-net detection: training in stages, evaluation (VOC07 mAP), prediction.

Public API::

    cfg = DetectConfig.from_preset("small", {"finetune": {"iterations": 800}})   # built-in shapes data
    run = train(cfg, out="runs/det")
    detector, classes, cfg = load_detector(run)
    val(run, split="test")   # {"mAP": .., "ap": {..}, "images": .., "seconds_per_image": ..}
    calibrate(run, split="val")  # per-class thresholds for predict (train does it when a val split exists)
    predict(run, ["a.jpg"], out="runs/det/predict")

Where things are (one idea per module):

* :mod:`.config`: every setting, one small config per stage, and the presets;
* :mod:`.data`: the data sets and their selective-search proposals;
* :mod:`.stages`: :func:`train`, the stage runner and one thin function per stage;
* :mod:`.backbone`, :mod:`.features`, :mod:`.finetune`, :mod:`.svm`,
  :mod:`.bbox_regression`: the algorithm of each stage;
* :mod:`.model`: building, saving and loading detectors;
* :mod:`.inference`: evaluation, calibration, prediction.

Run directory::

    config.json              the resolved DetectConfig (nested as the config classes)
    stages/<stage>.*         finished stages (detector weights after each), times.json
    finetune_last.safetensors, svm_last.safetensors   mid-stage checkpoints
    finetune.csv, finetune.png                        fine-tuning loss / accuracy
    backbone/                the pretraining classification run
    cache/                   proposals and features (content-keyed, checksummed)
    detector.safetensors     the final detector (weights + meta)
    thresholds.json          calibrated per-class score thresholds (stage 7 or ``calibrate``)
"""

from sppnet.engine.detect.backbone import pretrain_config
from sppnet.engine.detect.bbox_regression import BoxRegressionConfig
from sppnet.engine.detect.config import (
    PRESETS,
    BackboneConfig,
    DetectConfig,
    FeaturesConfig,
    ProposalConfig,
    TestConfig,
)
from sppnet.engine.detect.data import open_detection_data, proposals, split_proposals, training_set
from sppnet.engine.detect.finetune import FinetuneConfig
from sppnet.engine.detect.inference import (
    calibrate,
    default_threshold,
    evaluate,
    json_safe,
    predict,
    run_thresholds,
    usable_scorer,
    val,
)
from sppnet.engine.detect.model import build_detector, heads_trained, load_detector, stage_detector
from sppnet.engine.detect.stages import TrainingInterrupted, feature_cache, train
from sppnet.engine.detect.svm import SVMConfig

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "BoxRegressionConfig",
    "DetectConfig",
    "FeaturesConfig",
    "FinetuneConfig",
    "ProposalConfig",
    "SVMConfig",
    "TestConfig",
    "TrainingInterrupted",
    "build_detector",
    "calibrate",
    "default_threshold",
    "evaluate",
    "feature_cache",
    "heads_trained",
    "json_safe",
    "load_detector",
    "open_detection_data",
    "predict",
    "pretrain_config",
    "proposals",
    "run_thresholds",
    "split_proposals",
    "stage_detector",
    "train",
    "training_set",
    "usable_scorer",
    "val",
]
