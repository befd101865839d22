"""Self-supervised pretraining: iBOT-vMF model, augmentation, loss (with its centres), schedules,
DeepSpeed engine, trainer, backbone export and the fused vMF loss kernels."""
