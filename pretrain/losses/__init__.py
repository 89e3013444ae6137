"""One pure loss function per file."""
from .disco import disco_loss
from .infonce import infonce_loss

__all__ = ["disco_loss", "infonce_loss"]
