"""LEGO: block-by-block pre-training of transformer LMs with TRUE token-level early exit."""
