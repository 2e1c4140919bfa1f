"""Evaluation: metrics, model-based confidences, the coordinate baseline and the runner.

>>> from vlm_fo1.evaluation import evaluate
>>> report = evaluate(model, processor, records, image_root="data/mini")
>>> print(report.table())

Metric names are flat and stable (``detection/mAP``, ``detection/mAP@model``, ``counting/accuracy``,
``referring/acc50``, ``find_similar/precision`` …; ``coords/…`` for coordinate-format records);
see ``scoring`` for what each group reads from ``record.meta``. COCO metrics need the ``eval``
extra (pycocotools).
"""

from vlm_fo1.evaluation.confidence import (
    CONFIDENCE_MODES,
    RegionTokenProb,
    detection_confidence,
    detection_probabilities,
    region_token_probabilities,
)
from vlm_fo1.evaluation.coords import (
    COORDINATE_TASKS,
    boxes_to_text,
    count_from_box_text,
    parse_box_text,
    to_coordinate_record,
)
from vlm_fo1.evaluation.metrics import (
    DetectionTruth,
    ScoredDetection,
    coco_map,
    counting_accuracy,
    exact_match_accuracy,
    false_positive_rate,
    normalize_answer,
    precision_recall,
    rec_accuracy,
)
from vlm_fo1.evaluation.report import EvalReport
from vlm_fo1.evaluation.runner import evaluate, generate_answers, proposal_ranking_map, random_choice_map
from vlm_fo1.evaluation.scoring import TASK_GROUPS, GeneratedAnswer, score_records

__all__ = [
    "CONFIDENCE_MODES",
    "COORDINATE_TASKS",
    "TASK_GROUPS",
    "DetectionTruth",
    "EvalReport",
    "GeneratedAnswer",
    "RegionTokenProb",
    "ScoredDetection",
    "boxes_to_text",
    "coco_map",
    "count_from_box_text",
    "counting_accuracy",
    "detection_confidence",
    "detection_probabilities",
    "evaluate",
    "exact_match_accuracy",
    "false_positive_rate",
    "generate_answers",
    "normalize_answer",
    "parse_box_text",
    "precision_recall",
    "proposal_ranking_map",
    "random_choice_map",
    "rec_accuracy",
    "region_token_probabilities",
    "score_records",
    "to_coordinate_record",
]
