"""``FO1ForConditionalGeneration``: a base VLM that reads one region token per candidate box.

The forward pass is a pipeline of named steps:

1. ``encode_images``: the base ViT runs once; it yields the LLM's image tokens and, captured on
   the way, the hidden states of the chosen ViT blocks as raster maps.
2. ``encode_regions``: the auxiliary encoder's maps and the ViT maps are pooled per box by the
   hybrid region encoder, then projected to the LLM width by the connector.
3. ``splice_regions``: each ``<regionfeat>`` placeholder's embedding is replaced by its box's
   region token (the k-th placeholder of a sample gets its k-th box).
4. the stock base forward, with the ready input embeddings and the pre-encoded image; image
   tokens keep their 3-D M-RoPE positions, region tokens are ordinary text positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from vlm_fo1.config import FO1Config
from vlm_fo1.model.adapters import ImageEncoding, capture_outputs, get_adapter
from vlm_fo1.model.aux_encoder import aux_feature_geometry, build_aux_encoder, encode_aux
from vlm_fo1.model.label_spans import LabelSpanState, track_label_spans
from vlm_fo1.model.region_encoder import HybridRegionEncoder, build_connector

# Inputs used only when the prompt is first processed (dropped on cached decoding steps).
REGION_INPUT_NAMES = (
    "aux_pixel_values",
    "region_boxes_vit",
    "region_boxes_aux",
    "region_counts",
    "image_encoding",
    "region_tokens",
)


class FO1PreTrainedModel(PreTrainedModel):
    config: FO1Config
    config_class = FO1Config
    base_model_prefix = "fo1"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class FO1ForConditionalGeneration(FO1PreTrainedModel, GenerationMixin):
    """A base VLM (``vlm``) plus auxiliary encoder, hybrid region encoder and connector."""

    def __init__(self, config: FO1Config) -> None:
        super().__init__(config)
        self.adapter = get_adapter(config.base_config.model_type)
        self.vlm = self.adapter.build(config.base_config)
        aux_channels: list[int] = []
        aux_strides: list[float] = []
        self.aux_encoder = build_aux_encoder(config) if config.uses_aux_regions else None
        if self.aux_encoder is not None:
            aux_channels, aux_strides = aux_feature_geometry(self.aux_encoder)
        vit_channels = 0
        if config.uses_vit_regions:
            vit_channels = self.adapter.vit_hidden_size(config.base_config) * len(config.feature_blocks)
        self.region_encoder = HybridRegionEncoder(
            vit_channels=vit_channels,
            aux_channels=aux_channels,
            aux_strides=aux_strides,
            use_simple_fpn=config.use_simple_fpn,
            fpn_channels=config.fpn_channels,
            roi_output_size=config.roi_output_size,
            roi_sampling_ratio=config.roi_sampling_ratio,
            roi_aligned=config.roi_aligned,
            use_position_embedding=config.use_position_embedding,
            region_layer_norm=config.region_layer_norm,
        )
        self.connector = build_connector(
            config.connector_type, self.region_encoder.output_dim, config.text_config.hidden_size
        )
        hidden = config.text_config.hidden_size
        self.region_token_bn = (
            nn.BatchNorm1d(hidden, affine=False) if config.region_token_norm == "batch" else None
        )
        self.region_pointer = nn.Linear(hidden, hidden, bias=False) if config.region_pointer else None
        self.region_match = nn.Linear(hidden, hidden, bias=False) if config.region_pointer_match else None
        self.region_label_gate = nn.Linear(hidden, 1) if config.region_pointer_label_gate else None

        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "region_pointer", None) or module is getattr(self, "region_match", None):
            nn.init.zeros_(module.weight)  # starts as the plain LM head
        if module is getattr(self, "region_label_gate", None):
            nn.init.zeros_(module.weight)  # every span token weighs sigmoid(0): the plain mean
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Load an FO1 checkpoint, or an official release directory (``omchat_qwen2_5_vl``).

        An official directory is read by ``vlm_fo1.checkpoints.load_official`` (keyword
        arguments ``dtype`` and ``device`` apply); anything else goes to transformers.
        """
        from vlm_fo1.checkpoints.official import is_official_checkpoint, load_official  # avoids a cycle

        if is_official_checkpoint(pretrained_model_name_or_path):
            dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
            device = kwargs.pop("device", kwargs.pop("device_map", "cpu"))
            if args or kwargs:
                raise ValueError(f"unsupported arguments for an official checkpoint: {list(kwargs) or args}")
            return load_official(pretrained_model_name_or_path, dtype=dtype, device=device)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(
        self, save_directory: Any, *args: Any, save_original_format: bool = False, **kwargs: Any
    ) -> Any:
        """Save with our own parameter names (transformers would otherwise rename the base VLM's
        weights to its legacy layout, which a plain ``load_state_dict``, e.g. Trainer resume, cannot read)."""
        return super().save_pretrained(
            save_directory, *args, save_original_format=save_original_format, **kwargs
        )

    # -- embeddings (delegated to the base VLM) ----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Resize the base VLM's vocabulary (after adding tokens to the tokenizer)."""
        return self.vlm.resize_token_embeddings(*args, **kwargs)

    # -- pipeline steps ------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> ImageEncoding:
        """Run the base ViT once; also capture the region-feature blocks when the config uses them."""
        blocks = self.config.feature_blocks if self.config.uses_vit_regions else []
        return self.adapter.encode_images(self.vlm, pixel_values, image_grid_thw, blocks)

    def encode_regions(
        self,
        encoding: ImageEncoding,
        aux_pixel_values: torch.Tensor | None,
        region_boxes_vit: torch.Tensor,
        region_boxes_aux: torch.Tensor,
        region_counts: torch.Tensor,
        image_index: list[int],
    ) -> torch.Tensor:
        """Region tokens of every box of every sample, in order: ``(Σ region_counts, D_llm)``.

        Args:
            encoding: output of ``encode_images`` for the batch's images.
            aux_pixel_values: ``(num_images, 3, H, W)`` auxiliary-encoder inputs.
            region_boxes_vit: ``(B, N_max, 4)`` xyxy boxes in ViT-input pixels (padded).
            region_boxes_aux: ``(B, N_max, 4)`` xyxy boxes in auxiliary-input pixels (padded).
            region_counts: ``(B,)`` number of valid boxes per sample.
            image_index: for each sample, the index of its image in the batch's images (or -1).
        """
        num_images = len(encoding.frames)
        vit_boxes = [region_boxes_vit.new_zeros(0, 4) for _ in range(num_images)]
        aux_boxes = [region_boxes_aux.new_zeros(0, 4) for _ in range(num_images)]
        for sample, count in enumerate(region_counts.tolist()):
            if count and image_index[sample] < 0:
                raise ValueError(f"sample {sample} has {count} region boxes but no image")
            if count:
                vit_boxes[image_index[sample]] = region_boxes_vit[sample, :count]
                aux_boxes[image_index[sample]] = region_boxes_aux[sample, :count]
        aux_levels = None
        if self.aux_encoder is not None:
            if aux_pixel_values is None:
                raise ValueError("this model's region encoder needs aux_pixel_values, got None")
            aux_levels = self._encode_aux_where(aux_pixel_values, [len(b) > 0 for b in aux_boxes])
        maps = encoding.feature_maps
        regions = self.region_encoder(
            vit_features=[m.features for m in maps] if maps else None,
            vit_stride=maps[0].stride if maps else 1.0,
            vit_frames=encoding.frames,
            vit_boxes=vit_boxes,
            aux_levels=aux_levels,
            aux_boxes=aux_boxes,
        )  # (ΣN, region width), float32, images in order = samples in order
        tokens = self.connector(regions.to(self.connector_dtype))  # (ΣN, D_llm)
        return self._finish_region_tokens(tokens, region_counts)

    def _encode_aux_where(self, pixel_values: torch.Tensor, used: list[bool]) -> list[torch.Tensor]:
        """The auxiliary maps of the images that have boxes (``used``), zeros for the others, which
        no box pools from: one ``(num_images, C_i, H_i, W_i)`` map per level. A batch that mixes
        region records with region-free ones (captions, VQA) runs the DaViT only where needed."""
        if pixel_values.shape[0] != len(used):
            raise ValueError(
                f"aux_pixel_values must hold one image per image of the batch ({len(used)}), "
                f"got {pixel_values.shape[0]}"
            )
        if all(used):
            return encode_aux(self.aux_encoder, pixel_values)
        index = torch.tensor([i for i, u in enumerate(used) if u], device=pixel_values.device)
        levels = encode_aux(self.aux_encoder, pixel_values[index])
        return [
            level.new_zeros((len(used), *level.shape[1:])).index_copy(0, index, level) for level in levels
        ]

    def encode_sample(
        self, batch: Any, image_encoding: ImageEncoding | None = None
    ) -> tuple[ImageEncoding, torch.Tensor | None]:
        """The image encoding and region tokens ``(N, D_llm)`` (None without boxes) of a processor
        batch of one sample with one image, to pass to ``forward`` / ``generate`` as
        ``image_encoding`` and ``region_tokens`` for any prompt about that image and those boxes;
        ``image_encoding``: reuse a ViT encoding of the same image (only the regions run)."""
        if image_encoding is None:
            image_encoding = self.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        counts = batch.get("region_counts")
        if counts is None or int(counts.sum()) == 0:
            return image_encoding, None
        tokens = self.encode_regions(
            image_encoding,
            batch.get("aux_pixel_values"),
            batch["region_boxes_vit"],
            batch["region_boxes_aux"],
            counts,
            [0],
        )
        return image_encoding, tokens

    def _finish_region_tokens(
        self, tokens: torch.Tensor, counts: torch.Tensor, names: bool = True
    ) -> torch.Tensor:
        """Optional normalisation and name embedding (off in the release; see ``FO1Config``);
        ``names=False`` leaves the name embedding out (region perception pretraining)."""
        table = self.get_input_embeddings().weight
        if self.config.region_token_norm is not None:
            if self.region_token_bn is not None:
                bn = self.region_token_bn
                batch_stats = bn.training and tokens.shape[0] > 1  # one row has no batch statistics
                tokens = F.batch_norm(
                    tokens.float(),
                    bn.running_mean,
                    bn.running_var,
                    training=batch_stats,
                    momentum=bn.momentum,
                    eps=bn.eps,
                ).to(tokens.dtype)
            else:
                tokens = F.rms_norm(tokens, (tokens.shape[-1],))
            tokens = tokens * table.detach().float().pow(2).mean().sqrt().to(tokens.dtype)
        if self.config.region_name_embedding and names:
            index = torch.cat([torch.arange(int(n), device=tokens.device) for n in counts.tolist()])
            ids = torch.tensor(self.config.region_token_ids, device=tokens.device)[index]
            tokens = tokens + table[ids].to(tokens.dtype)
        return tokens

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def splice_regions(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        region_tokens: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """Put the k-th region token of each sample at its k-th ``<regionfeat>`` position.

        Args:
            input_ids: ``(B, T)``; inputs_embeds: ``(B, T, D)``; region_tokens: ``(ΣN, D)``;
            counts: ``(B,)`` boxes per sample.
        """
        mask = input_ids == self.config.region_feature_token_id  # (B, T)
        found = mask.sum(dim=1)
        if not torch.equal(found.cpu(), counts.cpu()):
            raise ValueError(
                f"each <regionfeat> placeholder needs one region box: placeholders per sample "
                f"{found.tolist()}, boxes per sample {counts.tolist()}"
            )
        return inputs_embeds.masked_scatter(mask[..., None], region_tokens.to(inputs_embeds.dtype))

    def _image_index(self, input_ids: torch.Tensor) -> list[int]:
        has_image = (input_ids == self.adapter.image_token_id(self.config.base_config)).any(dim=1).tolist()
        index, next_image = [], 0
        for flag in has_image:
            index.append(next_image if flag else -1)
            next_image += int(flag)
        return index

    def _check_no_placeholders(self, input_ids: torch.Tensor | None, cache: Any) -> None:
        decoding = cache is not None and cache.get_seq_length() > 0
        if input_ids is None or decoding or self.config.region_feature_token_id is None:
            return
        found = int((input_ids == self.config.region_feature_token_id).sum())
        if found:
            raise ValueError(
                f"input_ids hold {found} <regionfeat> placeholders but no region boxes were given"
            )

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        aux_pixel_values: torch.Tensor | None = None,
        region_boxes_vit: torch.Tensor | None = None,
        region_boxes_aux: torch.Tensor | None = None,
        region_counts: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_encoding: ImageEncoding | None = None,
        region_tokens: torch.Tensor | None = None,
        region_pointer_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
        region_pointer_label_state: LabelSpanState | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits (and loss with ``labels``) of the base VLM with region tokens spliced in.

        Args beyond the base VLM's:
            aux_pixel_values: ``(num_images, 3, H, W)`` auxiliary-encoder inputs.
            region_boxes_vit / region_boxes_aux: ``(B, N_max, 4)`` padded xyxy boxes in each
                encoder's input frame.
            region_counts: ``(B,)`` valid boxes per sample; must equal the number of
                ``<regionfeat>`` placeholders in each row of ``input_ids``.
            image_encoding / region_tokens: results of ``encode_images`` / ``encode_regions``
                computed earlier for these images and boxes (a cache: several questions about one
                image need the encoders once); ``image_grid_thw`` and ``region_counts`` are
                still needed for positions and placement.
            region_pointer_keys: with ``region_pointer``, the keys of the prompt's regions from an
                earlier forward (``outputs["region_pointer_keys"]``; generation carries them to
                cached decoding steps, whose inputs no longer hold the regions).
            region_pointer_label_state: with ``region_pointer_label``, the ``<ground>`` spans read
                by earlier forwards (``outputs["region_pointer_label_state"]``; carried likewise).
        """
        encoding = image_encoding
        if encoding is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            encoding = self.encode_images(pixel_values, image_grid_thw)
        has_regions = region_counts is not None and int(region_counts.sum()) > 0
        if has_regions:
            if input_ids is None:
                raise ValueError("region inputs need input_ids to locate the <regionfeat> placeholders")
            if region_tokens is None:
                if encoding is None:
                    raise ValueError("region inputs need the image (pixel_values and image_grid_thw)")
                region_tokens = self.encode_regions(
                    encoding,
                    aux_pixel_values,
                    region_boxes_vit,
                    region_boxes_aux,
                    region_counts,
                    self._image_index(input_ids),
                )
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds = self.splice_regions(input_ids, inputs_embeds, region_tokens, region_counts)
        else:
            self._check_no_placeholders(input_ids, cache)
        pointer = self.region_pointer is not None
        call = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=None if pointer else labels,
            use_cache=use_cache,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if not pointer:
            return self.adapter.forward(self.vlm, encoding, **call)
        with capture_outputs([self.adapter.final_norm(self.vlm)]) as captured:
            outputs = self.adapter.forward(self.vlm, encoding, **call)
        hidden = captured[0]  # (B, T, D): what the LM head reads
        queries = hidden
        if self.config.region_pointer_label:
            labels_t, outputs["region_pointer_label_state"] = self._pointer_labels(
                input_ids, hidden, region_pointer_label_state
            )
            queries = hidden + labels_t
            if self.region_match is not None:  # the label alone meets the region tokens' half of the keys
                queries = torch.cat([queries, labels_t], dim=-1)  # (B, T, 2D)
        if has_regions:
            region_pointer_keys = self._pointer_keys(input_ids, hidden, inputs_embeds, region_counts)
        if region_pointer_keys is not None:
            outputs.logits = self._add_pointer_logits(outputs.logits, queries, region_pointer_keys)
            outputs["region_pointer_keys"] = region_pointer_keys
        if labels is not None:  # the base model's own loss, on the logits with the pointer scores
            outputs.loss = self.vlm.loss_function(
                logits=outputs.logits, labels=labels, vocab_size=outputs.logits.shape[-1], **kwargs
            )
        return outputs

    # -- region pointer (``FO1Config.region_pointer``) ---------------------------------------------------
    def _pointer_keys(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, inputs_embeds: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's projected region keys, padded, ``(B, N_max, D)`` (``(B, N_max, 2D)`` with
        ``region_pointer_match``: ``[W h_N ; U r_N]``) and a valid mask ``(B, N_max)``.

        Region k of a sample is its k-th ``<regionfeat>`` position: ``h_N`` from ``hidden``
        ``(B, T, D)``, ``r_N`` from ``inputs_embeds`` ``(B, T, D)``."""
        at = input_ids == self.config.region_feature_token_id
        n_max = int(counts.max())
        valid = torch.arange(n_max, device=hidden.device)[None, :] < counts.to(hidden.device)[:, None]

        def padded(states: torch.Tensor) -> torch.Tensor:  # (ΣN, D), samples in order → (B, N_max, D)
            keys = states.new_zeros(counts.shape[0], n_max, states.shape[-1])
            keys[valid] = states
            return keys

        keys = self.region_pointer(padded(hidden[at]))
        if self.region_match is not None:
            keys = torch.cat([keys, self.region_match(padded(inputs_embeds[at].to(hidden.dtype)))], dim=-1)
        return keys, valid

    def _pointer_labels(
        self, input_ids: torch.Tensor | None, hidden: torch.Tensor, state: LabelSpanState | None
    ) -> tuple[torch.Tensor, LabelSpanState]:
        """The labels ``ê_t`` ``(B, T, D)`` of the pointer queries (see ``model.label_spans``) and the
        span state after this forward's tokens; with ``region_pointer_label_gate`` each token's
        embedding is weighted by ``sigmoid(g · h_i + c)`` from ``hidden`` ``(B, T, D)`` (the label
        is RMS-normalised, so the weights' scale does not matter, only their ratios)."""
        if input_ids is None:
            raise ValueError("region_pointer_label reads the <ground> spans from input_ids, got None")
        open_id, close_id = self.config.ground_token_ids
        embeddings = self.get_input_embeddings()(input_ids)
        if self.region_label_gate is not None:
            embeddings = embeddings.to(hidden.dtype) * torch.sigmoid(self.region_label_gate(hidden))
        labels, _, state = track_label_spans(input_ids, embeddings, open_id, close_id, state)
        return labels.to(hidden.dtype), state

    def _add_pointer_logits(
        self, logits: torch.Tensor, queries: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """``logits`` ``(B, L, V)`` with ``q_t · k_N / sqrt(D)`` added to each valid ``<regionN>``
        column; ``queries`` ``(B, T, K)`` with ``T ≥ L`` (the last ``L`` positions are scored) and
        keys ``(B, N_max, K)``; ``K`` is ``D`` or ``2D`` (``region_pointer_match``), ``D`` the
        hidden size."""
        projected, valid = keys
        queries = queries[:, queries.shape[1] - logits.shape[1] :]  # (B, L, K)
        scale = self.config.text_config.hidden_size**0.5
        scores = torch.einsum("bld,bnd->bln", queries, projected) / scale
        scores = scores * valid[:, None, :].to(scores.dtype)  # (B, L, N_max)
        ids = torch.tensor(self.config.region_token_ids[: scores.shape[-1]], device=logits.device)
        return logits.index_add(-1, ids, scores.to(logits.dtype))

    # -- generation ----------------------------------------------------------------------------------------
    def _prepare_position_ids_for_generation(
        self, inputs_tensor: torch.Tensor, model_kwargs: dict
    ) -> torch.Tensor:
        return self.adapter.prepare_position_ids_for_generation(self.vlm, inputs_tensor, model_kwargs)

    def _update_model_kwargs_for_generation(
        self, outputs: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        for name in ("region_pointer_keys", "region_pointer_label_state"):  # for the cached steps
            if name in outputs:
                model_kwargs[name] = outputs[name]
        return model_kwargs

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        first = bool(kwargs.get("is_first_iteration", False))
        use_cache = kwargs.get("use_cache", True)
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if not first and use_cache:
            for name in (*REGION_INPUT_NAMES, "pixel_values", "image_grid_thw"):
                inputs.pop(name, None)
        else:  # the whole sequence is read again: its <ground> spans too
            inputs.pop("region_pointer_label_state", None)
        return inputs
