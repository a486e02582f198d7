"""The stage pipeline: glues model, data and tracking into one experiment (Hydra lives here, not in the model).
It never imports the report (`lego.report` reads its outputs); what both need is `lego.common`'s.

`load_run(run_dir)` rebuilds a trained run's model, tokenizer and config for analysis in Python."""

from lego.pipeline.loading import LoadedRun, load_run

__all__ = ["LoadedRun", "load_run"]
