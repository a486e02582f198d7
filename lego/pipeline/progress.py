"""A progress bar per stage, fed by the `callback` of `LEGOBlock.fit`: loss, tokens/s, validation PPL."""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm


class StageProgress:
    """Callable for `fit(callback=...)`; also forwards every event to `on_event` (e.g. W&B logging)."""

    def __init__(self, stage: int, total_steps: int, enabled: bool, on_event: Callable[[dict], None] | None = None):
        self.bar = tqdm(total=total_steps, desc=f"stage {stage}", unit="step", disable=not enabled, leave=True)
        self.on_event = on_event
        self.started = time.perf_counter()
        self.tokens = 0
        self.loss = float("nan")
        self.val_ppl: float | None = None

    def __call__(self, event: dict) -> None:
        if event["kind"] == "step":
            self.tokens += event["tokens"]
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            self.loss = event.get("lm_loss", self.loss)  # the losses come every trainer.log_every_steps steps
            postfix = {"loss": f"{self.loss:.3f}", "tok/s": f"{rate:,.0f}"}
            if self.val_ppl is not None:
                postfix["val_ppl"] = f"{self.val_ppl:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(event["step"] - self.bar.n)  # absolute: a resumed stage starts mid-way
        elif event["kind"] == "eval":
            self.val_ppl = event["val_ppl"]
        if self.on_event:
            self.on_event(event)

    def close(self) -> None:
        self.bar.close()
