"""The miniature world: procedural scenes, a simulated proposal network and tasks built on them.

Small enough for a tiny VLM to learn on a CPU in minutes (design.md §6); everything is
deterministic from integer seeds. Typical use::

    from vlm_fo1.synthetic import generate_dataset, TaskMix
    train = generate_dataset("data/mini", 2000, seed=0, split_name="train")
    stage0 = generate_dataset("data/mini", 2000, seed=0, mix=TaskMix.general(), split_name="stage0")
    val = generate_dataset("data/mini", 200, seed=0, split_name="val")
"""

from vlm_fo1.synthetic.dataset import (
    DIFFICULTIES,
    build_scene,
    derive_seed,
    difficulty_configs,
    generate_dataset,
    scene_truth,
)
from vlm_fo1.synthetic.described import DESCRIBED_TASKS, EMPTY_WORD, describe, region_words, write_described
from vlm_fo1.synthetic.language import (
    CAPTION_QUESTION,
    VQA_QUESTION_FORMS,
    image_caption,
    object_phrase,
    plural,
    referring_expressions,
    vqa_questions,
    world_vocabulary,
)
from vlm_fo1.synthetic.proposals import (
    RELEASE_NMS_IOU,
    ProposalConfig,
    Proposals,
    match_proposals,
    simulate_proposals,
)
from vlm_fo1.synthetic.scenes import WORD_KIND, Scene, SceneConfig, SceneObject, render_scene
from vlm_fo1.synthetic.tasks import (
    GENERAL_TASKS,
    NEGATIVE_TASKS,
    REGION_TASKS,
    TASK_NAMES,
    NegativeBalance,
    TaskMix,
    grounding_answer,
    make_records,
)

__all__ = [
    "CAPTION_QUESTION",
    "DESCRIBED_TASKS",
    "DIFFICULTIES",
    "EMPTY_WORD",
    "GENERAL_TASKS",
    "NEGATIVE_TASKS",
    "REGION_TASKS",
    "RELEASE_NMS_IOU",
    "TASK_NAMES",
    "VQA_QUESTION_FORMS",
    "WORD_KIND",
    "NegativeBalance",
    "ProposalConfig",
    "Proposals",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "TaskMix",
    "build_scene",
    "derive_seed",
    "describe",
    "difficulty_configs",
    "generate_dataset",
    "grounding_answer",
    "image_caption",
    "make_records",
    "match_proposals",
    "object_phrase",
    "plural",
    "referring_expressions",
    "region_words",
    "render_scene",
    "scene_truth",
    "simulate_proposals",
    "vqa_questions",
    "world_vocabulary",
    "write_described",
]
