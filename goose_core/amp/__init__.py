"""Mixed precision across ranks: fp16 dynamic loss scaling agreed by every rank (GradScaler)."""

from goose_core.amp.grad_scaler import GradScaler

__all__ = ["GradScaler"]
