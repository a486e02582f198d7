"""What the pipeline and the report share, below both so that neither imports the other: run metadata
(`runmeta`: overrides, run labels, the result-neutral keys; stdlib only) and plotting helpers (`plotting`:
matplotlib, imported only by the two plot modules)."""
