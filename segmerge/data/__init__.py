"""segmerge.data: BraTS-like phantoms, dataset loading/validation and MONAI transforms."""

from segmerge.data.anatomy import Anatomy, mni_anatomy
from segmerge.data.nifti import save_nifti
from segmerge.data.phantom import PhantomCase, make_phantom_case

__all__ = ["Anatomy", "PhantomCase", "make_phantom_case", "mni_anatomy", "save_nifti"]
