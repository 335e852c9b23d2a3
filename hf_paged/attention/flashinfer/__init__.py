"""The FlashInfer executor (CUDA). Importing this package never imports FlashInfer itself: the
executor imports it on its first plan (support.import_flashinfer)."""
