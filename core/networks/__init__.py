"""Networks: the architectures a bundle names and the ensemble network that averages several.

- ``models``: 2D MONAI networks by name (``build_model``), their output layer and its prior bias;
- ``ensemble``: several networks at their own input sizes as one module (mean probability);
- ``resample``: the resize matrices (numpy) that the ensemble, the predictors and the trainer share.

Nothing is imported here, so ``core.networks.resample`` loads without torch. A new architecture goes
into ``models.MODELS`` (and its name into ``core.config.ARCHS``).
"""
