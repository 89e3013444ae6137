"""DisCo: distillation of a frozen self-supervised teacher into a lightweight student, with a MoCo-v2 testbed."""
