"""Training methods beyond LEGO's own staged one (`lego.fitting`), each on the shared loop (`lego.training`):
`universal`, the Universal Training Framework (every layer trained jointly). Model code: torch, numpy and
safetensors only; `lego.pipeline` runs them from Hydra."""
