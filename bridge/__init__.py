"""Telepathy bridge: models, the soft-token bridge, wire codec, checkpoints, training and evaluation.

Nothing in this package opens a network socket; the services in `sender_service/`, `receiver_service/`
and `gateway/` call into it.
"""

__version__ = "0.1.0"
