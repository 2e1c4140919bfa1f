"""``FO1Config``: the architecture of an FO1 model as a transformers config.

An FO1 model is a base vision-language model (``base_config``, Qwen2.5-VL today) plus an
auxiliary vision encoder (a timm model, DaViT in the release), a hybrid region encoder that turns
each candidate box into one vector, and a connector that projects that vector to the language
model's width. Every closed choice is validated here, with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from vlm_fo1.prompting import tokens as T

AUX_RESIZE_MODES = ("squash", "dynamic", "dynamic_square")
REGION_SOURCES = ("hybrid", "vit", "aux")
CONNECTOR_TYPES = ("linear", "mlp2x_gelu")
REGION_TOKEN_NORMS = (None, "rms", "batch")

# Square sides that ``dynamic_square`` picks from (the release's list, official-release.md §2.3).
DYNAMIC_SQUARE_SIDES = (384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1280, 1536, 1792, 2048)


def _check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"FO1Config.{field} must be one of {list(choices)}, got {value!r}")


def _check_positive(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"FO1Config.{field} must be a positive int, got {value!r}")


@strict
class FO1Config(PreTrainedConfig):
    r"""Configuration of [`FO1ForConditionalGeneration`].

    Args:
        base_config: config of the base VLM (a ``Qwen2_5_VLConfig`` or its dict).
        aux_encoder_name: timm model name of the auxiliary encoder (``davit_huge_fl`` is the
            Florence-2-large DaViT of the release).
        aux_encoder_kwargs: extra kwargs for ``timm.create_model`` (e.g. smaller dims for tests).
        aux_image_size: side of the auxiliary encoder's input for ``squash``.
        aux_resize_mode: ``squash`` (resize to a square, ignoring aspect), ``dynamic`` (no
            resize) or ``dynamic_square`` (square side from a fixed list by closest area).
        aux_mean, aux_std: per-channel normalisation of the auxiliary input (ImageNet).
        vit_feature_blocks: ViT blocks whose outputs feed region features (channel-concatenated);
            ``None`` means the full-attention blocks of the base ViT.
        use_simple_fpn: pass the ViT features through a simple feature pyramid (4 levels).
        fpn_channels: channels of each pyramid level.
        roi_output_size, roi_sampling_ratio, roi_aligned: ``torchvision.ops.roi_align`` options
            (the release: 7 or 14, -1, ``False``).
        region_source: ``hybrid`` (aux then ViT features, concatenated), ``vit`` or ``aux`` only.
        use_position_embedding: add the sine-cosine embedding of (cy, cx, h... see model code).
        region_layer_norm: LayerNorm on each branch's pooled features.
        connector_type: ``mlp2x_gelu`` (Linear-GELU-Linear) or ``linear``.
        region_token_norm: not in the release; for models trained from scratch, whose region
            tokens otherwise collapse into one constant vector that carries no region
            information. ``None``: off (the release); ``rms``: each token RMS-normalised to the
            RMS of the input embedding table; ``batch``: each feature standardised over the
            batch's region tokens (BatchNorm without affine, running statistics at inference),
            then scaled to that RMS, so the tokens cannot stop varying.
        region_name_embedding: not in the release; add the embedding of ``<regionN>`` to region
            token N, so a region token carries its own name (retrieval needs one attention hop).
        region_pointer: not in the release; add to the logit of ``<regionN>`` a bilinear score
            between the answer position's last hidden state and region N's last hidden state
            (``h_t · W h_N / sqrt(D)``, ``W`` zero-initialised), so naming a region points at
            its token's content instead of being a token the LM head must learn per index.
        region_pointer_label: not in the release; with ``region_pointer``, the query at each
            position adds the label of the latest closed ``<ground>…</ground>`` span before it
            (the mean input embedding of its tokens, RMS-normalised), so the regions the answer
            names are chosen with the words it was asked about (``h_t + ê_t``); needs
            ``ground_token_ids``.
        region_pointer_match: not in the release; with ``region_pointer_label``, the pointer
            also scores that label directly against each region's input token (the vector
            spliced in at its ``<regionfeat>``): ``+ ê_t · U r_N / sqrt(D)``, ``U``
            zero-initialised, a match of the asked words with the region's content that needs
            no language-model layer.
        region_pointer_label_gate: not in the release; with ``region_pointer_label``, each
            token of a ``<ground>`` span counts in the label with a weight read from the language
            model's last hidden state at that token (``sigmoid(g · h_i + c)``, ``g`` and ``c``
            zero-initialised, so it starts as the plain mean), so a label can keep the words
            that name the target and drop the rest ("the square left of *the star*").

        max_regions: maximum number of boxes per image (the number of ``<regionN>`` tokens).
        region_feature_token / region_token_template: the placeholder and region name strings.
        region_feature_token_id: id of the placeholder in the tokenizer (set with the tokenizer).
        region_token_ids: ids of ``<region0>``… in order (set with the tokenizer; used for
            constrained decoding and confidences).
        ground_token_ids: ids of ``<ground>`` and ``</ground>`` (set with the tokenizer; used by
            ``region_pointer_label``).
    """

    model_type = "vlm_fo1"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "base_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl")
    }

    base_config: dict | PreTrainedConfig | None = None
    aux_encoder_name: str = "davit_huge_fl"
    aux_encoder_kwargs: dict | None = None
    aux_image_size: int = 768
    aux_resize_mode: str = "squash"
    aux_mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406)
    aux_std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225)
    vit_feature_blocks: list[int] | tuple[int, ...] | None = None
    use_simple_fpn: bool = True
    fpn_channels: int = 512
    roi_output_size: int = 7
    roi_sampling_ratio: int = -1
    roi_aligned: bool = False
    region_source: str = "hybrid"
    use_position_embedding: bool = True
    region_layer_norm: bool = False
    connector_type: str = "mlp2x_gelu"
    region_token_norm: str | None = None
    region_name_embedding: bool = False
    region_pointer: bool = False
    region_pointer_label: bool = False
    region_pointer_match: bool = False
    region_pointer_label_gate: bool = False
    max_regions: int = T.DEFAULT_MAX_REGIONS
    region_feature_token: str = T.REGION_FEATURE_TOKEN
    region_token_template: str = T.REGION_TOKEN_TEMPLATE
    region_feature_token_id: int | None = None
    region_token_ids: list[int] | tuple[int, ...] | None = None
    ground_token_ids: list[int] | tuple[int, ...] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        try:  # JSON-shaped (tuples become lists), so a saved config loads back equal
            self.aux_encoder_kwargs = json.loads(json.dumps(dict(self.aux_encoder_kwargs or {})))
        except TypeError as err:
            raise ValueError(f"FO1Config.aux_encoder_kwargs must be JSON-serialisable: {err}") from err
        self.aux_mean = list(self.aux_mean)
        self.aux_std = list(self.aux_std)
        if self.vit_feature_blocks is not None:
            self.vit_feature_blocks = [int(b) for b in self.vit_feature_blocks]
        if self.region_token_ids is not None:
            self.region_token_ids = [int(i) for i in self.region_token_ids]
        if self.ground_token_ids is not None:
            self.ground_token_ids = [int(i) for i in self.ground_token_ids]
        self.validate_fo1()

    def validate_fo1(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        _check_choice("aux_resize_mode", self.aux_resize_mode, AUX_RESIZE_MODES)
        _check_choice("region_source", self.region_source, REGION_SOURCES)
        _check_choice("connector_type", self.connector_type, CONNECTOR_TYPES)
        _check_choice("region_token_norm", self.region_token_norm, REGION_TOKEN_NORMS)
        for name in ("aux_image_size", "fpn_channels", "roi_output_size", "max_regions"):
            _check_positive(name, getattr(self, name))
        if self.roi_sampling_ratio == 0 or self.roi_sampling_ratio < -1:
            raise ValueError(
                f"FO1Config.roi_sampling_ratio must be -1 or positive, got {self.roi_sampling_ratio}"
            )
        for name in ("aux_mean", "aux_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"FO1Config.{name} must have 3 values, got {getattr(self, name)}")
        if "{}" not in self.region_token_template:
            raise ValueError(
                f"FO1Config.region_token_template must contain '{{}}', got {self.region_token_template!r}"
            )
        depth = self.vit_config.depth
        blocks = self.feature_blocks
        if not blocks or any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"FO1Config.vit_feature_blocks must be indexes in [0, {depth}), got {blocks}")
        for name in ("region_name_embedding", "region_pointer"):
            if getattr(self, name) and self.region_token_ids is None:
                raise ValueError(f"FO1Config.{name} needs region_token_ids (the <regionN> ids)")
        if self.region_pointer_label and not self.region_pointer:
            raise ValueError("FO1Config.region_pointer_label needs region_pointer=True, got False")
        if self.region_pointer_match and not self.region_pointer_label:
            raise ValueError("FO1Config.region_pointer_match needs region_pointer_label=True, got False")
        if self.region_pointer_label_gate and not self.region_pointer_label:
            raise ValueError("FO1Config.region_pointer_label_gate needs region_pointer_label=True, got False")
        if self.region_pointer_label and self.ground_token_ids is None:
            raise ValueError("FO1Config.region_pointer_label needs ground_token_ids (<ground>, </ground>)")
        if self.ground_token_ids is not None and len(self.ground_token_ids) != 2:
            raise ValueError(
                f"FO1Config.ground_token_ids must be the 2 ids of <ground> and </ground>, "
                f"got {self.ground_token_ids}"
            )
        if self.region_token_ids is not None and len(self.region_token_ids) != self.max_regions:
            raise ValueError(
                f"FO1Config.region_token_ids must have max_regions={self.max_regions} ids, "
                f"got {len(self.region_token_ids)}"
            )

    # -- derived values ---------------------------------------------------------------------------------
    @property
    def text_config(self) -> PreTrainedConfig:
        """The base VLM's language-model config."""
        return self.base_config.get_text_config()

    @property
    def vit_config(self) -> PreTrainedConfig:
        """The base VLM's vision-encoder config."""
        return self.base_config.vision_config

    @property
    def feature_blocks(self) -> list[int]:
        """ViT blocks that feed region features (``vit_feature_blocks`` or the full-attention blocks)."""
        if self.vit_feature_blocks is not None:
            return list(self.vit_feature_blocks)
        return [int(b) for b in self.vit_config.fullatt_block_indexes]

    @property
    def uses_vit_regions(self) -> bool:
        return self.region_source in ("hybrid", "vit")

    @property
    def uses_aux_regions(self) -> bool:
        return self.region_source in ("hybrid", "aux")

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    def region_token(self, index: int) -> str:
        """The name of region ``index`` (``<region{index}>``)."""
        return self.region_token_template.format(index)


AutoConfig.register(FO1Config.model_type, FO1Config)
