"""Proposal networks: where VLM-FO1's candidate boxes come from.

Every proposer follows :class:`ProposalNetwork` (``name`` and ``propose(image, labels=None)``)
and returns a :class:`ProposalSet`: ``(N, 4)`` float32 xyxy boxes in original image pixels, ``(N,)``
scores sorted descending, optional labels. Built in (``available_proposers()``):

- ``given``: boxes the user supplies (Python, JSON, COCO results, the release's JSONL);
- ``omdet-turbo``, ``grounding-dino``, ``owlv2``: open-vocabulary detectors from transformers;
- ``synthetic``: the miniature world's simulated proposal network.

Typical use::

    from vlm_fo1.proposals import build_proposer
    proposer = build_proposer("omdet-turbo", model="path/to/omdet-turbo-swin-tiny-hf")
    proposals = proposer.propose(image, labels=["cat", "dog"])  # at most 100 boxes
"""

from vlm_fo1.proposals.base import (
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    FilteredProposer,
    ProposalNetwork,
    ProposalSet,
    UnionProposer,
    as_proposal_set,
    available_proposers,
    build_proposer,
    check_filter,
    merge_proposals,
    postprocess,
    register_proposer,
)
from vlm_fo1.proposals.detectors import (
    DEFAULT_LABELS,
    GroundingDinoProposer,
    OmDetTurboProposer,
    Owlv2Proposer,
    TransformersDetector,
    load_pretrained,
)
from vlm_fo1.proposals.given import GivenProposer, read_given_file
from vlm_fo1.proposals.synthetic import SyntheticProposer

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_NMS_IOU",
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_TOP_K",
    "FilteredProposer",
    "GivenProposer",
    "GroundingDinoProposer",
    "OmDetTurboProposer",
    "Owlv2Proposer",
    "ProposalNetwork",
    "ProposalSet",
    "SyntheticProposer",
    "TransformersDetector",
    "UnionProposer",
    "as_proposal_set",
    "available_proposers",
    "build_proposer",
    "check_filter",
    "load_pretrained",
    "merge_proposals",
    "postprocess",
    "read_given_file",
    "register_proposer",
]
