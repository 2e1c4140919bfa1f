"""The miniature world's simulated proposal network as a proposer (registered as ``synthetic``).

:func:`vlm_fo1.synthetic.simulate_proposals` needs the scene's ground truth, so this proposer
knows the scenes it may be shown and recognises each image: first by identity (the scene's own
``PIL`` image), then by its pixels (an image re-read from a lossless file), and last, with a
warning, as the only known scene of that size. The boxes are drawn once per scene from a seed
derived from ``seed`` and the scene's seed, so repeated calls agree; precomputed proposals (the
ones a generated data set stores) can be given instead.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from vlm_fo1.proposals.base import FilteredProposer, ProposalSet, register_proposer
from vlm_fo1.synthetic.dataset import derive_seed
from vlm_fo1.synthetic.proposals import ProposalConfig, Proposals, simulate_proposals
from vlm_fo1.synthetic.scenes import Scene

logger = logging.getLogger(__name__)


def _fingerprint(image: Image.Image) -> tuple[tuple[int, int], str]:
    """``(size, sha1 of the RGB pixels)`` of an image."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.size, hashlib.sha1(rgb.tobytes()).hexdigest()


def _scene_list(scenes: Scene | Sequence[Scene] | Mapping[Any, Scene]) -> list[Scene]:
    if isinstance(scenes, Scene):
        return [scenes]
    values = list(scenes.values()) if isinstance(scenes, Mapping) else list(scenes)
    for index, scene in enumerate(values):
        if not isinstance(scene, Scene):
            raise ValueError(f"scene {index}: expected a Scene, got {type(scene).__name__}")
    if not values:
        raise ValueError("SyntheticProposer needs at least one scene, got none")
    return values


@register_proposer("synthetic")
class SyntheticProposer(FilteredProposer):
    """Simulated class-agnostic proposals for known miniature-world scenes.

    Args:
        scenes: one scene, a list, or a mapping (its keys are ignored; images are recognised).
        config: the simulated network's behaviour (default :class:`ProposalConfig`).
        seed: base seed; scene ``s`` draws its boxes from ``derive_seed(seed, s.seed, "proposals")``.
        proposals: optional precomputed :class:`Proposals`, one per scene, used instead of drawing.
        score_threshold / nms_iou / top_k: the filter of :func:`postprocess`; by default none,
            so the boxes are exactly what the data set generator gives the model in training.
    """

    name = "synthetic"

    def __init__(
        self,
        scenes: Scene | Sequence[Scene] | Mapping[Any, Scene],
        config: ProposalConfig | None = None,
        seed: int = 0,
        *,
        proposals: Sequence[Proposals] | None = None,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        top_k: int | None = None,
    ) -> None:
        self._set_filter(score_threshold, nms_iou, top_k)
        self.scenes = _scene_list(scenes)
        self.config = config if config is not None else ProposalConfig()
        self.seed = int(seed)
        if proposals is not None and len(proposals) != len(self.scenes):
            raise ValueError(f"expected one Proposals per scene ({len(self.scenes)}), got {len(proposals)}")
        self._cache: dict[int, Proposals] = dict(enumerate(proposals)) if proposals is not None else {}
        self._by_pixels = {_fingerprint(scene.image): i for i, scene in enumerate(self.scenes)}

    def scene_index(self, image: Image.Image) -> int:
        """Index of the scene ``image`` shows (identity, then pixels, then unique size).

        Raises:
            ValueError: when no known scene matches.
        """
        for index, scene in enumerate(self.scenes):
            if image is scene.image:
                return index
        index = self._by_pixels.get(_fingerprint(image))
        if index is not None:
            return index
        same_size = [i for i, scene in enumerate(self.scenes) if scene.size == image.size]
        if len(same_size) == 1:
            logger.warning(
                "image of size %s matches no scene's pixels; using the only scene of that size (seed %d)",
                image.size,
                self.scenes[same_size[0]].seed,
            )
            return same_size[0]
        raise ValueError(
            f"the image (size {image.size}) matches none of the {len(self.scenes)} known scenes "
            f"({len(same_size)} of that size); expected one of their images"
        )

    def simulated(self, image: Image.Image) -> Proposals:
        """The raw simulated proposals (with matched objects and IoUs) for ``image``'s scene."""
        index = self.scene_index(image)
        if index not in self._cache:
            scene = self.scenes[index]
            rng = random.Random(derive_seed(self.seed, scene.seed, "proposals"))
            self._cache[index] = simulate_proposals(scene, self.config, rng)
        return self._cache[index]

    def propose(self, image: Image.Image, labels: Sequence[str] | None = None) -> ProposalSet:
        """Simulated boxes (``(N, 4)`` xyxy scene pixels) for ``image``; ``labels`` are ignored."""
        del labels
        simulated = self.simulated(image)
        raw = ProposalSet([list(box) for box in simulated.boxes], list(simulated.scores), None)
        return self._filter(raw, image.size)
