"""Inference: bundle -> masks, the same way in every path (PyTorch, ONNX Runtime, Serve, SageMaker).

- ``slices``: input rules, preprocessing, test-time augmentation, thresholds and post-processing
  (numpy only, so torch-free runtimes use it too); ``postprocess`` and ``quality`` beside it;
- ``resize``: the resize on torch tensors (the trainer and the PyTorch predictor);
- ``predictor``: ``Predictor``, PyTorch inference for one bundle;
- ``results``: a scan's ``VolumeResult`` and ``result_json``, the one answer schema of every path;
- ``spacing``: the voxel spacing an answer is made at (a scan's, a slice stack's given or assumed one);
- ``jobs``: what `core predict` and `serve batch` make of their inputs;
- ``predict``: what `python -m core predict` writes; ``cli``: its command line.

Nothing is imported here, so ``core.inference.slices`` loads without torch.
"""
