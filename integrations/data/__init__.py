"""`integrations.data`: the images the main job and the benchmarks train on, read from what is
installed (no downloads).

- `digits`: scikit-learn's bundled 8 x 8 digits (and any image folder) as an `ImageList`, with the
  stratified splits and the views of the main job.
- `fashion_mnist`: a checked reader of the four Fashion-MNIST IDX files (Debian's
  ``dataset-fashion-mnist``, torchvision's ``FashionMNIST/raw`` or any directory).

Imports: the core and `integrations.recipes` (the view specs) only.
"""
