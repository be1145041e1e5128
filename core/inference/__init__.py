"""Inference: bundle -> masks, the same way in every path (PyTorch, ONNX Runtime, Serve, SageMaker).

- ``slices``: input rules, resize matrices, test-time augmentation, thresholds and post-processing
  (numpy only, so torch-free runtimes use it too);
- ``resize``: the same resize on torch tensors (the trainer and the PyTorch predictor);
- ``predictor``: ``Predictor``, PyTorch inference for one bundle;
- ``predict``: the `python -m core predict` command.

Nothing is imported here, so ``core.inference.slices`` loads without torch.
"""
