"""Training methods beyond LEGO's own staged one (`lego.fitting`), each on the shared loop (`lego.training`):
`universal`, the Universal Training Framework (every layer trained jointly), and `mod`, Mixture-of-Depths (a
router per layer lets a share of each sequence's tokens through it). Model code: torch, numpy and
safetensors only; `lego.pipeline` runs them from Hydra."""
