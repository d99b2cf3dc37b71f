"""FFT sizes: pad to lengths whose only prime factors are 2, 3, 5 and 7.

pocketfft (CPU) and cuFFT (GPU) are fastest on such lengths; an arbitrary length with
a large prime factor can be several times slower.
"""

from __future__ import annotations

import functools

__all__ = ["good_fft_size"]


@functools.lru_cache(maxsize=None)
def good_fft_size(n: int) -> int:
    """Smallest integer ``>= n`` whose prime factors are all in {2, 3, 5, 7}.

    Parameters
    ----------
    n : int
        Minimum length (>= 1).

    Returns
    -------
    int

    Examples
    --------
    >>> [good_fft_size(n) for n in (1, 11, 97, 127)]
    [1, 12, 98, 128]
    """
    n = max(int(n), 1)
    m = n
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1
