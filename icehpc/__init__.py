"""icehpc: iBOT-vMF representations of ice-crystal images and vMF diversity (κ) as a batch pipeline.

Stages (one module each): synth → shards → data/augment → model/pretrain → embed → store → kappa
→ report, plus probe. Importing the package does no work and imports no heavy dependency.
"""
__version__ = "0.1.0"
