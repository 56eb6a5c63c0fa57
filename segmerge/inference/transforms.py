"""The one inference transform MONAI does not have: stack whichever sequences a case has.

MONAI's ``ConcatItemsd`` concatenates keys that are all present; a prediction case may lack any
of the four sequences, and the network expects all four channels in ``MODALITIES`` order plus an
availability mask. This transform fills absent channels with zeros (what training does with
dropped modalities, see ``docs/architecture.md``) and records the mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from segmerge.conventions import MODALITIES

__all__ = ["StackModalitiesd"]

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between two sequences' affines still read as 'co-registered'."""


class StackModalitiesd(MapTransform):
    """Stack loaded sequences into one ``(len(keys), H, W, D)`` image; absent ones become zeros.

    Not invertible and not tracked on purpose: inverting the spatial transforms that follow it
    (``Orientationd``, ``Spacingd``) is all a prediction needs to return to the input's grid.

    Args:
        keys: modality keys in channel order (default: ``MODALITIES``).
        image_key: key receiving the stacked image.
        available_key: key receiving the ``(len(keys),)`` bool availability mask.
        case_key: key holding the case name, quoted in error messages.
        delete_keys: drop the per-modality keys after stacking (saves memory).
    """

    def __init__(
        self,
        keys: Sequence[str] = MODALITIES,
        image_key: str = "image",
        available_key: str = "available",
        case_key: str = "case_id",
        delete_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.available_key = available_key
        self.case_key = case_key
        self.delete_keys = delete_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Stack the present keys of ``data``; raise ``ValueError`` if none or if grids differ."""
        d = dict(data)
        case = d.get(self.case_key, "?")
        present = [k for k in self.keys if k in d and d[k] is not None]
        if not present:
            raise ValueError(
                f"case {case}: none of the sequences {', '.join(map(str, self.keys))} is present"
            )
        ref_key = present[0]
        ref = d[ref_key]
        if ref.ndim != 4 or ref.shape[0] != 1:
            raise ValueError(
                f"case {case}: {ref_key} must be one 3D volume (1, H, W, D) after loading, got shape "
                f"{tuple(ref.shape)}"
            )
        for key in present[1:]:
            img = d[key]
            if tuple(img.shape) != tuple(ref.shape):
                raise ValueError(
                    f"case {case}: {key} has shape {'x'.join(map(str, img.shape[1:]))} but {ref_key} has "
                    f"{'x'.join(map(str, ref.shape[1:]))} (sequences must be co-registered on one grid)"
                )
            if isinstance(img, MetaTensor) and isinstance(ref, MetaTensor):
                diff = float(np.abs(np.asarray(img.affine) - np.asarray(ref.affine)).max())
                if diff > AFFINE_TOLERANCE_MM:
                    raise ValueError(
                        f"case {case}: {key} and {ref_key} have different affines (max difference "
                        f"{diff:.4g} > {AFFINE_TOLERANCE_MM}); sequences must be co-registered"
                    )
        zeros = torch.zeros_like(torch.as_tensor(ref), dtype=torch.float32)
        channels = [
            torch.as_tensor(d[k], dtype=torch.float32) if k in present else zeros for k in self.keys
        ]
        stacked = torch.cat(channels, dim=0)
        # keep the reference sequence's metadata (affine, original affine, filename) on the stack
        meta = dict(ref.meta) if isinstance(ref, MetaTensor) else {}
        d[self.image_key] = MetaTensor(stacked, meta=meta)
        d[self.available_key] = torch.tensor([k in present for k in self.keys], dtype=torch.bool)
        if self.delete_keys:
            for k in present:
                if k != self.image_key:
                    del d[k]
        return d
