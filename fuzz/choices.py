"""Where a fuzz input's decisions come from: atheris's FuzzedDataProvider (coverage-guided)
or a seeded random.Random (the reproducible engine the test suite uses). Mutators only ask
for integers, picks and bytes, so both engines drive the same code."""
import random


class RandomChoices:
    def __init__(self, seed):
        self._r = random.Random(seed)

    def int(self, lo, hi):
        return self._r.randint(lo, hi)

    def bytes(self, n):
        return self._r.randbytes(n)


class AtherisChoices:
    def __init__(self, fdp):
        self._fdp = fdp

    def int(self, lo, hi):
        return self._fdp.ConsumeIntInRange(lo, hi)

    def bytes(self, n):
        data = self._fdp.ConsumeBytes(n)
        return data + bytes(n - len(data))


def pick(choices, seq):
    return seq[choices.int(0, len(seq) - 1)]
