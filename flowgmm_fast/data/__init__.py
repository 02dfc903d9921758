"""Data pipelines for FlowGMM training scripts.

- :mod:`flowgmm_fast.data.images` -- readers of MNIST / CIFAR-10 / SVHN and of any dataset in MNIST's IDX format
  (torchvision on-disk formats or a prepared folder), balanced label splits in the original layout, the two-stream
  semi-supervised loader, dequantisation.
- :mod:`flowgmm_fast.data.tabular`, :mod:`flowgmm_fast.data.toy` -- feature vectors and 2-D toy data (imported on
  use, not here).
"""

from .images import (DATASETS, ImageData, LabelSplitError, SemiSupervisedLoader, augment, balanced_split,
                     canonical_dataset_name, dequantize, eval_batches, label_split_path, load_image_dataset,
                     load_label_split, save_label_split)

__all__ = ["DATASETS", "ImageData", "canonical_dataset_name", "load_image_dataset", "balanced_split",
           "label_split_path", "save_label_split", "load_label_split", "LabelSplitError", "dequantize", "augment",
           "SemiSupervisedLoader", "eval_batches"]
