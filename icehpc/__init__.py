"""icehpc: iBOT-vMF representations of ice-crystal images and vMF diversity (κ) as a batch pipeline.

Layers (each imports only from those before it): ``config``, ``dist``, ``fileio``, ``vmf`` →
``data/`` (shard format, synthetic data, shard building, loaders) → ``ssl/`` (model, augmentation,
loss, training, export, kernels) → ``analysis/`` (store, embed, kappa, report, probe) → ``run/``
(stage table, CLI, submitit, pipeline). Importing the package does no work and imports no heavy
dependency.
"""
__version__ = "0.1.0"
