"""The stage pipeline: glues model, data and tracking into one experiment (Hydra lives here, not in the model)."""
