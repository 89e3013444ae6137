"""One pure loss function per file."""
from .attention import attention_loss
from .compress import compress_loss
from .dino import dino_center, dino_loss, dino_pairs, dino_teacher_probs
from .disco import disco_loss
from .infonce import infonce_loss
from .kd import kd_loss
from .rkd import rkd_angle_loss, rkd_distance_loss
from .seed import seed_loss
from .swav import sinkhorn, swapped_prediction

__all__ = ["attention_loss", "compress_loss", "dino_center", "dino_loss", "dino_pairs", "dino_teacher_probs",
           "disco_loss", "infonce_loss", "kd_loss", "rkd_angle_loss", "rkd_distance_loss", "seed_loss", "sinkhorn",
           "swapped_prediction"]
