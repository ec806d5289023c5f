"""Inference: the 3D U-Net, its checkpoints and the worker process. Never imports pymmcore."""
