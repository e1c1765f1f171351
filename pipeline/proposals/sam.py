"""SAM everything-mode proposals, equal to SamAutomaticMaskGenerator but doing less work.

Same masks, scores and order as ``segment_anything.SamAutomaticMaskGenerator(crop_n_layers=0,
min_mask_region_area=0)`` with the same model, image and parameters (up to float rounding), because it
runs the same preprocessing, the same decoder maths on the same prompts, the same upsampling, the same
filters and the same NMS. What it does not do:

* upsample masks that the predicted-IoU filter drops (that filter needs only the decoder's scores);
* hold every full-resolution logit map at once: masks are upsampled, scored, boxed and RLE-encoded
  in chunks, on the model's device, and only compressed RLEs leave the device;
* run SAM's per-mask Python RLE loop and MaskData's deep copies: pycocotools encodes a whole chunk
  in one C call;
* stream (heads x 4096 x 4096) attention scores through memory in the image encoder's global
  blocks (``sam_encoder``: same operations, tiled) or run the decoder's image-token projections once
  per prompt (``sam_decoder``: the same maths restructured).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from samcp.models.sam_decoder import decode_points
from samcp.pipeline.proposals.base import Proposals, encode_masks_wh
from samcp.pipeline.proposals.sam_encoder import set_image_fast
from samcp.pipeline.proposals.sam_params import SamEverythingParams


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points in [0, 1]^2, cell centres, x fastest (SAM's grid and order)."""
    side = np.linspace(1 / (2 * n_per_side), 1 - 1 / (2 * n_per_side), n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) inclusive XYXY boxes, [0, 0, 0, 0] for empty masks (SAM's rule)."""
    k, h, w = masks.shape
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    top = torch.where(rows, ar_h, h).amin(dim=1)
    bottom = torch.where(rows, ar_h, -1).amax(dim=1)
    left = torch.where(cols, ar_w, w).amin(dim=1)
    right = torch.where(cols, ar_w, -1).amax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    empty = ~rows.any(dim=1)
    return boxes.masked_fill(empty[:, None], 0)


class SamEverythingGenerator:
    """Everything-mode mask proposals from a loaded SAM model.

    Args:
        model: a ``segment_anything`` Sam module (see ``samcp.pipeline.foundation.load_sam``).
        params: the everything-mode parameters.
    """

    name = "sam"

    def __init__(self, model: torch.nn.Module, params: SamEverythingParams | None = None) -> None:
        from segment_anything import SamPredictor

        self.model = model
        self.params = params or SamEverythingParams()
        self.predictor = SamPredictor(model)
        self._grid = point_grid(self.params.points_per_side)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def generate(
        self,
        image: np.ndarray,
        return_embedding: bool = False,
        features: torch.Tensor | None = None,
    ):
        """Proposals for one HxWx3 uint8 RGB image (and SAM's image embedding if asked).

        ``features``: a (1, C, G, G) image embedding to decode instead of running SAM's image
        encoder (e.g. SAM2CLIP's); it must lie in SAM's input frame (the image resized so its
        longer side is the encoder's ``img_size``, padded bottom/right), as SAM's own does.
        """
        p = self.params
        h, w = image.shape[:2]
        if features is None:
            set_image_fast(self.predictor, image)
            features = self.predictor.features
            input_size = self.predictor.input_size
        else:
            features = self._check_features(features)
            t = self.predictor.transform
            input_size = t.get_preprocess_shape(h, w, t.target_length)
        thr = self.model.mask_threshold
        chunk = p.upsample_chunk or (64 if self.device.type == "cuda" else 4)

        points = self._grid * np.array([[w, h]], dtype=np.float64)
        # SAM transforms the prompts in float64 and only casts inside the prompt encoder; do the same.
        coords = torch.as_tensor(
            self.predictor.transform.apply_coords(points, (h, w)), device=self.device
        )

        kept_rles: list[bytes] = []
        kept_boxes, kept_iou, kept_stab, kept_pts = [], [], [], []
        for start in range(0, len(points), p.points_per_batch):
            c = coords[start : start + p.points_per_batch]
            low_res, iou = decode_points(self.model, features, c)
            low_res = low_res.flatten(0, 1)
            iou = iou.flatten(0, 1)
            pts = torch.as_tensor(points[start : start + p.points_per_batch], device=self.device)
            pts = pts.repeat_interleave(low_res.shape[0] // max(len(c), 1), dim=0)
            if p.pred_iou_thresh > 0.0:
                keep = iou > p.pred_iou_thresh
                low_res, iou, pts = low_res[keep], iou[keep], pts[keep]
            for s in range(0, low_res.shape[0], chunk):
                logits = self._upsample(low_res[s : s + chunk], input_size, (h, w))
                hi = (logits > thr + p.stability_score_offset).sum((-1, -2), dtype=torch.int32)
                lo = (logits > thr - p.stability_score_offset).sum((-1, -2), dtype=torch.int32)
                stab = hi / lo
                ci, cp = iou[s : s + chunk], pts[s : s + chunk]
                if p.stability_score_thresh > 0.0:
                    keep = stab >= p.stability_score_thresh
                    logits, stab, ci, cp = logits[keep], stab[keep], ci[keep], cp[keep]
                if logits.shape[0] == 0:
                    continue
                binary = logits > thr
                del logits
                kept_boxes.append(masks_to_boxes_xyxy(binary))
                kept_iou.append(ci)
                kept_stab.append(stab)
                kept_pts.append(cp)
                # (K, W, H) C-order is (H, W, K) Fortran order: what pycocotools encodes, no copy.
                mwh = binary.transpose(1, 2).contiguous().to(torch.uint8).cpu().numpy()
                kept_rles.extend(encode_masks_wh(mwh.transpose(2, 1, 0)))

        if not kept_rles:
            out = Proposals(h, w)
            return (out, features) if return_embedding else out
        boxes = torch.cat(kept_boxes)
        ious = torch.cat(kept_iou)
        keep = (
            batched_nms(
                boxes.float(), ious, torch.zeros_like(ious, dtype=torch.int64), p.box_nms_thresh
            )
            .cpu()
            .numpy()
        )
        out = Proposals.from_rles(
            h,
            w,
            [kept_rles[i] for i in keep],
            predicted_iou=ious.cpu().numpy()[keep],
            stability_score=torch.cat(kept_stab).float().cpu().numpy()[keep],
            point_coords=torch.cat(kept_pts).cpu().numpy()[keep],
        )
        return (out, features) if return_embedding else out

    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        want = (1, pe.embed_dim, *pe.image_embedding_size)
        if tuple(features.shape) != want:
            raise ValueError(
                f"the image embedding is {tuple(features.shape)} but this SAM's decoder takes "
                f"{want}"
            )
        return features.to(self.device, torch.float32)

    def _upsample(self, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
        """SAM's postprocess_masks on a (K, h, w) stack: to the padded input, crop, to the image.

        The padded part of the first upsampling is cropped away right after it, so only the
        low-res rows/columns that reach the unpadded region are upsampled. With an integer factor
        and the output size an exact multiple, bilinear interpolation of the cropped input uses the
        same source coordinates and weights, so the result is the same.
        """
        size = self.model.image_encoder.img_size
        lh, lw = low_res.shape[-2:]
        if size % lh == 0 and size % lw == 0:
            fh, fw = size // lh, size // lw
            rh = min(lh, -(-input_size[0] // fh) + 1)
            rw = min(lw, -(-input_size[1] // fw) + 1)
            x = F.interpolate(
                low_res[:, None, :rh, :rw], (rh * fh, rw * fw), mode="bilinear", align_corners=False
            )
        else:
            x = F.interpolate(low_res[:, None], (size, size), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
        return x[:, 0]
