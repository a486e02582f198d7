"""The block-training loop and its parts, shared by every training method (LEGO's `lego.fitting`, Universal's
`lego.methods.universal`):

- `loop`: the loop itself (`train_loop` over a `Method`), divergence guard, distributed steps;
- `optim`: AdamW parameter groups, the learning-rate schedule, gradient clipping with the exit classifiers apart;
- `checkpoint`: the one step-checkpoint format (plain tensors only) and loading it back;
- `propagation`: a block's input, per-token losses, evaluation, propagation and routing over data;
- `selection`: hard-token selection by ratio and threshold calibration;
- `ltt`: Learn-then-Test, risk-controlled thresholds (`trainer.calibration=ltt`, docs/calibration.md);
- `precision`: the forwards' precision (`trainer.precision`) as an autocast context;
- `throughput`: tokens/s and MFU against a table of devices' bf16 peaks;
- `prefetch`: batches gathered ahead into pinned memory in a background thread, on CUDA.

Model code like the package's top level: torch, numpy and safetensors only.
"""
