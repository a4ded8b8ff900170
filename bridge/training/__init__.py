"""Training and evaluation: `telepathy train`, `telepathy eval`, `telepathy report`, and what they share."""
