"""Optimizer construction with parameter groups (no weight decay on 1-D parameters and biases)."""
