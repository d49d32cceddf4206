"""Argument checks shared by the library modules, so each kind of bad value is refused in one wording."""
import numbers

import numpy as np


def is_int(value):
    """An integer (Python or numpy) that is not a bool: True is an int to Python, never a size or an id here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name, value):
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_non_negative_int(name, value):
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_int_in(name, value, low, high, *, shown=None):
    """value in [low, high]; ``shown`` writes the range as the message should (e.g. "[1, 2**24]")."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {shown or f'[{low}, {high}]'}, got {value!r}")
    return int(value)


def check_int_type(name, value):
    """Any int (negative values are meaningful, e.g. a label); only the type is checked."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_probability(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_rng(rng):
    """``rng`` as numpy's ``default_rng`` takes it: a Generator or BitGenerator (draws advance it), a
    non-negative int seed, or None. Returns the Generator or BitGenerator itself, else the seed (or None),
    so that each caller decides what a seed keys."""
    if rng is None or isinstance(rng, (np.random.Generator, np.random.BitGenerator)):
        return rng
    if is_int(rng) and rng >= 0:
        return int(rng)
    raise TypeError(f"rng must be a numpy Generator or BitGenerator, a non-negative int seed or None, got {rng!r}")


def bit_generator_of(rng):
    """The BitGenerator a Generator draws from (or the BitGenerator itself): what the kernels advance."""
    bit_generator = rng.bit_generator if isinstance(rng, np.random.Generator) else rng
    if not isinstance(bit_generator, np.random.BitGenerator):
        raise TypeError(f"rng must be a numpy Generator or BitGenerator, got {type(rng).__name__}")
    return bit_generator
