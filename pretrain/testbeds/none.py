from ..methods import TESTBEDS, Testbed


@TESTBEDS.register()
class NoTestbed(Testbed):
    """No self-supervised objective of the student's own: the distillers alone train it (SEED, pure DisCo)."""

    name = "none"
