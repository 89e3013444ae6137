"""DisCo: distillation of a frozen self-supervised teacher into a lightweight student, with a MoCo-v2 testbed."""
import warnings

# Two warnings third-party packages print about their own code at import time, which a user of these tools can do
# nothing about (every tool imports this package first): fvcore's focal loss, imported by detectron2.engine, calls
# torch.jit.script at import (this project never does); detectron2's model_zoo imports pkg_resources.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated as an API", category=UserWarning,
                        module=r"detectron2\.model_zoo\.")
