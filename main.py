"""Training and evaluation entry point (ConvNeXt/DeiT style); filled in by the training pipeline."""
