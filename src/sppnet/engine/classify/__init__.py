"""SPP-net classification: training with single-, multi- and random-size schedules,
evaluation with the paper's test views, prediction.

Public API::

    cfg = ClassifyConfig.from_preset("small", schedule="multi", epochs=8)
    run = train(cfg, out="runs/cls")                 # built-in shapes data (or cfg.data)
    model, classes, cfg = load_classifier(run)
    evaluate(model, ImageFolderDataset(root, "test", classes=classes), "full", cfg)
    # {"top1": 0.91, "top5": 1.0, "images": 800, "views": "full", "views_per_image": 1.0}
    predict(model, ["cat.jpg"], classes, views="full", cfg=cfg)

One module per job, in the order the data flows:

* :mod:`~sppnet.engine.classify.config`: :class:`ClassifyConfig` (every setting,
  saved as ``config.json``) and the ``small`` / ``paper`` presets;
* :mod:`~sppnet.engine.classify.schedules`: the input size of each epoch (Sec. 2.3),
  the learning rate of each step and the plateau rule (Sec. 3.1);
* :mod:`~sppnet.engine.classify.data`: ImageFolder splits, seeded augmentation,
  test-view datasets, loaders;
* :mod:`~sppnet.engine.classify.training`: :func:`train` (the loop, checkpoints,
  resume, the run folder's layout);
* :mod:`~sppnet.engine.classify.inference`: :func:`load_classifier`,
  :func:`evaluate`, :func:`predict`.
"""

from sppnet.engine.classify.config import MODEL_PRESETS, PAPER_RECIPE, PRESETS, ClassifyConfig
from sppnet.engine.classify.data import builtin_data_root, open_image_folder
from sppnet.engine.classify.inference import evaluate, load_classifier, predict
from sppnet.engine.classify.schedules import LR_SCHEDULES, SCHEDULES, LRSchedule, SizeSchedule
from sppnet.engine.classify.training import TrainingInterrupted, build_model, train

__all__ = [
    "MODEL_PRESETS",
    "PAPER_RECIPE",
    "ClassifyConfig",
    "PRESETS",
    "LR_SCHEDULES",
    "LRSchedule",
    "SCHEDULES",
    "SizeSchedule",
    "TrainingInterrupted",
    "train",
    "load_classifier",
    "evaluate",
    "predict",
    "build_model",
    "open_image_folder",
    "builtin_data_root",
]
