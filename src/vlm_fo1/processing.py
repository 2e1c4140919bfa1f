"""``FO1Processor``: chat messages + image + boxes → the tensors of both encoders and the LLM.

Frames. Boxes are given as xyxy in the original image's pixels. The image is first fitted for
the encoders (long side ≤ 2048, short side ≥ 28, bicubic), then
- the Qwen image processor resizes it to multiples of 28 px (``grid × patch``): ViT frame;
- the auxiliary transform resizes it per ``aux_resize_mode``: auxiliary frame.
Each box goes from the original frame to each encoder's frame by one ``scale_boxes`` call (the
fitting step cancels out), after ``sanitize_boxes`` has checked and clipped it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_fo1.boxes import BoxReport, sanitize_boxes, scale_boxes
from vlm_fo1.config import AUX_RESIZE_MODES, DYNAMIC_SQUARE_SIDES, FO1Config
from vlm_fo1.encoding import ChatEncoder, EncodedChat, ImageSlot
from vlm_fo1.images import fit_for_encoders, load_image
from vlm_fo1.prompting import tokens as T

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "fo1_processor_config.json"
QWEN_MIN_PIXELS = 3136  # stock Qwen2.5-VL preprocessor_config.json
QWEN_MAX_PIXELS = 12845056


@dataclass(frozen=True)
class PreparedImage:
    """An image made ready for both encoders (reusable across prompts).

    Attributes:
        original_size: ``(width, height)`` of the image as given.
        pixel_values: ``(S, 3 * temporal * patch²)`` Qwen patches; grid_thw: ``(1, 3)``.
        vit_size: ``(width, height)`` of the ViT input frame.
        aux_pixel_values: ``(3, H_aux, W_aux)`` normalised auxiliary input.
        num_image_tokens: LLM image tokens (``t * h * w / merge²``).
    """

    original_size: tuple[int, int]
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    vit_size: tuple[int, int]
    aux_pixel_values: torch.Tensor
    num_image_tokens: int

    @property
    def aux_size(self) -> tuple[int, int]:
        return (int(self.aux_pixel_values.shape[2]), int(self.aux_pixel_values.shape[1]))


@dataclass(frozen=True)
class SampleInfo:
    """What a caller needs to read one sample's answer back into the original image.

    Attributes:
        image_size: ``(width, height)`` of the original image (None without an image).
        boxes: ``(N, 4)`` xyxy boxes in original pixels, after clipping; index i is ``<region{i}>``.
        box_report: which boxes were clipped or have zero area.
    """

    image_size: tuple[int, int] | None
    boxes: torch.Tensor
    box_report: BoxReport | None


class FO1Batch(BatchFeature):
    """Model inputs (a ``BatchFeature``: ``model(**batch)``) plus ``samples``: per-sample ``SampleInfo``."""

    samples: list[SampleInfo]


class FO1Processor:
    """Turns conversations, images and boxes into FO1 model inputs.

    Args:
        tokenizer: a Qwen2 tokenizer holding the FO1 tokens (``<regionfeat>``, ``<region0>``…).
        image_processor: the Qwen image processor (default: stock settings).
        max_regions: most boxes per image.
        aux_image_size / aux_resize_mode / aux_mean / aux_std: the auxiliary encoder's input.
        max_image_side: images are first downscaled so their long side is at most this.
        system_prompt: the default system turn (None: no system turn unless given).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        *,
        max_regions: int = T.DEFAULT_MAX_REGIONS,
        aux_image_size: int = 768,
        aux_resize_mode: str = "squash",
        aux_mean: Sequence[float] = (0.485, 0.456, 0.406),
        aux_std: Sequence[float] = (0.229, 0.224, 0.225),
        max_image_side: int = 2048,
        system_prompt: str | None = T.DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        if aux_resize_mode not in AUX_RESIZE_MODES:
            raise ValueError(
                f"aux_resize_mode must be one of {list(AUX_RESIZE_MODES)}, got {aux_resize_mode!r}"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor or Qwen2VLImageProcessorPil(
            min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS
        )
        self.max_regions = max_regions
        self.aux_image_size = aux_image_size
        self.aux_resize_mode = aux_resize_mode
        self.aux_mean = [float(v) for v in aux_mean]
        self.aux_std = [float(v) for v in aux_std]
        self.max_image_side = max_image_side
        self.system_prompt = system_prompt
        self.chat = ChatEncoder(tokenizer, max_regions, system_prompt)

    @classmethod
    def from_config(cls, tokenizer: Any, config: FO1Config, **kwargs: Any) -> FO1Processor:
        """A processor matching a model config (ViT patching, aux input, region count)."""
        vit = config.vit_config
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=kwargs.pop("min_pixels", QWEN_MIN_PIXELS),
            max_pixels=kwargs.pop("max_pixels", QWEN_MAX_PIXELS),
            patch_size=vit.patch_size,
            temporal_patch_size=vit.temporal_patch_size,
            merge_size=vit.spatial_merge_size,
        )
        settings = dict(
            max_regions=config.max_regions,
            aux_image_size=config.aux_image_size,
            aux_resize_mode=config.aux_resize_mode,
            aux_mean=config.aux_mean,
            aux_std=config.aux_std,
        )
        settings.update(kwargs)
        return cls(tokenizer, image_processor, **settings)

    # -- token ids ---------------------------------------------------------------------------------------
    @property
    def region_feature_token_id(self) -> int:
        return self.chat.ids[T.REGION_FEATURE_TOKEN]

    @property
    def region_token_ids(self) -> list[int]:
        """Ids of ``<region0>`` … ``<region{max_regions-1}>``."""
        return [self.chat.ids[T.region_token(i)] for i in range(self.max_regions)]

    # -- images ------------------------------------------------------------------------------------------
    def _aux_resize(self, image: Image.Image) -> Image.Image:
        if self.aux_resize_mode == "squash":
            side = self.aux_image_size
            return image.resize((side, side), Image.Resampling.BICUBIC)
        if self.aux_resize_mode == "dynamic_square":
            area = image.width * image.height
            side = min(DYNAMIC_SQUARE_SIDES, key=lambda s: abs(s * s - area))
            return image.resize((side, side), Image.Resampling.BICUBIC)
        return image

    def _aux_pixels(self, fitted: Image.Image) -> torch.Tensor:
        aux = np.asarray(self._aux_resize(fitted), dtype=np.float32) / 255.0
        aux = (aux - np.asarray(self.aux_mean, np.float32)) / np.asarray(self.aux_std, np.float32)
        return torch.from_numpy(aux).permute(2, 0, 1).contiguous()

    def aux_pixel_values(self, image: Any) -> torch.Tensor:
        """``(3, H_aux, W_aux)``: the auxiliary encoder's input alone (what :meth:`prepare_image`
        gives as ``aux_pixel_values``, without the ViT's preprocessing)."""
        return self._aux_pixels(fit_for_encoders(load_image(image), max_side=self.max_image_side))

    def prepare_image(self, image: Any) -> PreparedImage:
        """Load and encode-ready an image (path, PIL or array); see the module docstring."""
        if isinstance(image, PreparedImage):
            return image
        rgb = load_image(image)
        fitted = fit_for_encoders(rgb, max_side=self.max_image_side)
        qwen = self.image_processor(images=[fitted], return_tensors="pt")
        grid = qwen["image_grid_thw"]
        merge = int(self.image_processor.merge_size)
        patch = int(self.image_processor.patch_size)
        _, gh, gw = (int(v) for v in grid[0])
        return PreparedImage(
            original_size=rgb.size,
            pixel_values=qwen["pixel_values"],
            grid_thw=grid,
            vit_size=(gw * patch, gh * patch),
            aux_pixel_values=self._aux_pixels(fitted),
            num_image_tokens=int(grid.prod()) // (merge * merge),
        )

    # -- one sample --------------------------------------------------------------------------------------
    def _encode_sample(
        self, messages: Any, image: Any, boxes: Any, add_generation_prompt: bool, region_texts: Any = None
    ) -> tuple[EncodedChat, PreparedImage | None, SampleInfo, torch.Tensor, torch.Tensor]:
        if image is None:
            if boxes is not None and len(boxes):
                raise ValueError(f"got {len(boxes)} boxes but no image")
            encoded = self.chat.encode(
                messages, None, add_generation_prompt=add_generation_prompt, region_texts=region_texts
            )
            empty = torch.zeros(0, 4)
            return encoded, None, SampleInfo(None, empty, None), empty, empty
        prepared = self.prepare_image(image)
        clean, report = sanitize_boxes(
            [] if boxes is None else boxes, prepared.original_size, max_regions=self.max_regions
        )
        slot = ImageSlot(num_image_tokens=prepared.num_image_tokens, num_regions=len(clean))
        encoded = self.chat.encode(messages, slot, add_generation_prompt=add_generation_prompt)
        vit_boxes = scale_boxes(clean, prepared.original_size, prepared.vit_size)
        aux_boxes = scale_boxes(clean, prepared.original_size, prepared.aux_size)
        return encoded, prepared, SampleInfo(prepared.original_size, clean, report), vit_boxes, aux_boxes

    # -- batch -------------------------------------------------------------------------------------------
    def __call__(
        self,
        conversations: Any,
        images: Any = None,
        boxes: Any = None,
        *,
        add_generation_prompt: bool = True,
        return_labels: bool = False,
        padding_side: str = "left",
        max_length: int | None = None,
        region_texts: Sequence[Sequence[str] | None] | None = None,
    ) -> FO1Batch:
        """Encode one conversation or a batch of them.

        Args:
            conversations: a prompt (str or ``Prompt``), a conversation (list of messages), or a
                list of conversations.
            images: one image per conversation (path, PIL, array, ``PreparedImage`` or None).
            boxes: one ``(N_i, 4)`` box list per conversation, xyxy in original pixels.
            add_generation_prompt: end with the assistant header (unless the last turn is assistant).
            return_labels: add ``labels`` (-100 except assistant answers) for training.
            padding_side: ``left`` for generation, ``right`` for training.
            max_length: raise ``ValueError`` for longer samples (no silent truncation).
            region_texts: per conversation, regions described in words instead of an image (or None).
        """
        batch, images, boxes = self._as_batch(conversations, images, boxes)
        if region_texts is None:
            region_texts = [None] * len(batch)
        elif len(region_texts) != len(batch):
            raise ValueError(
                f"expected one region_texts entry per conversation: {len(batch)}, got {len(region_texts)}"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        encoded, prepared, samples, vit_boxes, aux_boxes = [], [], [], [], []
        for i, messages in enumerate(batch):
            enc, prep, info, vb, ab = self._encode_sample(
                messages, images[i], boxes[i], add_generation_prompt, region_texts[i]
            )
            if max_length is not None and len(enc.input_ids) > max_length:
                raise ValueError(
                    f"sample {i} has {len(enc.input_ids)} tokens, more than max_length={max_length}"
                )
            encoded.append(enc)
            samples.append(info)
            vit_boxes.append(vb)
            aux_boxes.append(ab)
            if prep is not None:
                prepared.append(prep)
        data = self._pad_tokens(encoded, padding_side, return_labels)
        data.update(self._stack_images(prepared))
        data.update(self._stack_boxes(vit_boxes, aux_boxes))
        result = FO1Batch(data=data)
        result.samples = samples
        return result

    def _as_batch(
        self, conversations: Any, images: Any, boxes: Any
    ) -> tuple[list[Any], list[Any], list[Any]]:
        single = (
            isinstance(conversations, (str, dict))
            or hasattr(conversations, "content")
            or (isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], dict))
        )
        if single:
            if isinstance(conversations, str) or hasattr(conversations, "content"):
                conversations = [{"role": "user", "content": conversations}]
            return [conversations], [images], [boxes]
        batch = list(conversations)
        images = [None] * len(batch) if images is None else list(images)
        boxes = [None] * len(batch) if boxes is None else list(boxes)
        if not batch or len(images) != len(batch) or len(boxes) != len(batch):
            raise ValueError(
                f"expected one image and one box list per conversation: {len(batch)} conversations, "
                f"{len(images)} images, {len(boxes)} box lists"
            )
        return batch, images, boxes

    def _pad_tokens(self, encoded: list[EncodedChat], side: str, labels: bool) -> dict[str, torch.Tensor]:
        length = max(len(e.input_ids) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        image_id = self.chat.ids[T.IMAGE_PAD]
        ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        target = torch.full((len(encoded), length), -100, dtype=torch.long)
        for row, enc in enumerate(encoded):
            n = len(enc.input_ids)
            span = slice(length - n, length) if side == "left" else slice(0, n)
            row_ids = torch.tensor(enc.input_ids, dtype=torch.long)
            ids[row, span] = row_ids
            mask[row, span] = 1
            target[row, span] = torch.where(torch.tensor(enc.trainable), row_ids, torch.tensor(-100))
        data = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_id).int() * mask}
        if labels:
            data["labels"] = target
        return data

    @staticmethod
    def _stack_images(prepared: list[PreparedImage]) -> dict[str, torch.Tensor]:
        if not prepared:
            return {}
        height = max(p.aux_pixel_values.shape[1] for p in prepared)
        width = max(p.aux_pixel_values.shape[2] for p in prepared)
        aux = torch.zeros(len(prepared), 3, height, width)  # zero = mean colour after normalisation
        for i, p in enumerate(prepared):
            aux[i, :, : p.aux_pixel_values.shape[1], : p.aux_pixel_values.shape[2]] = p.aux_pixel_values
        return {
            "pixel_values": torch.cat([p.pixel_values for p in prepared]),
            "image_grid_thw": torch.cat([p.grid_thw for p in prepared]),
            "aux_pixel_values": aux,
        }

    @staticmethod
    def _stack_boxes(vit_boxes: list[torch.Tensor], aux_boxes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = torch.tensor([len(b) for b in vit_boxes], dtype=torch.long)
        if int(counts.sum()) == 0:
            return {}
        width = int(counts.max())
        padded_vit = torch.zeros(len(vit_boxes), width, 4)
        padded_aux = torch.zeros(len(vit_boxes), width, 4)
        for i, (vb, ab) in enumerate(zip(vit_boxes, aux_boxes, strict=True)):
            padded_vit[i, : len(vb)] = vb
            padded_aux[i, : len(ab)] = ab
        return {"region_boxes_vit": padded_vit, "region_boxes_aux": padded_aux, "region_counts": counts}

    # -- text --------------------------------------------------------------------------------------------
    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids → text with region names and tags kept, chat end tokens removed."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        for stop in (T.IM_END, T.END_OF_TEXT):
            text = text.split(stop, 1)[0]
        return text

    # -- persistence -------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "max_regions": self.max_regions,
            "aux_image_size": self.aux_image_size,
            "aux_resize_mode": self.aux_resize_mode,
            "aux_mean": self.aux_mean,
            "aux_std": self.aux_std,
            "max_image_side": self.max_image_side,
            "system_prompt": self.system_prompt,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer, Qwen image processor and FO1 settings to ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(self.settings(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> FO1Processor:
        """Load a processor saved by ``save_pretrained``, or an official release directory."""
        from vlm_fo1.checkpoints.official import (
            is_official_checkpoint,
            load_official_processor,
        )  # avoids a cycle

        path = Path(directory)
        settings_file = path / PROCESSOR_CONFIG_NAME
        if not settings_file.is_file():
            if is_official_checkpoint(path) and not overrides:
                return load_official_processor(path)
            raise ValueError(
                f"expected {PROCESSOR_CONFIG_NAME} (or an official release layout) in {str(path)!r}"
            )
        settings = json.loads(settings_file.read_text())
        settings.update(overrides)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        return cls(tokenizer, image_processor, **settings)
