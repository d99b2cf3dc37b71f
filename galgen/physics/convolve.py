"""PSF convolution of image batches by zero-padded FFTs (no wrap-around).

Convention: an image's profile centre is at pixel ``(H//2, W//2)`` and a PSF kernel's
centre at ``(P//2, Q//2)``; convolving keeps a profile's centre where it was. The
result has the shape of the input images and is the linear (not circular)
convolution restricted to that grid: light that the PSF scatters beyond the edges is
lost, and light from beyond the edges is absent — pad the input (about twice the
stamp) when the PSF wings matter.
"""

from __future__ import annotations

import torch

from ..errors import GalgenInputError
from .fft import good_fft_size

__all__ = ["convolve", "psf_transfer", "pixelate"]


def _check_images(images, name="images"):
    if not isinstance(images, torch.Tensor):
        raise GalgenInputError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (2, 3):
        raise GalgenInputError(f"{name}: expected shape (H, W) or (B, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise GalgenInputError(f"{name}: expected a floating tensor, got {images.dtype}")


def psf_transfer(psf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Real FFT of a PSF zero-padded to ``shape`` (the transfer function used by :func:`convolve`).

    Parameters
    ----------
    psf : torch.Tensor
        ``(P, Q)`` or ``(B, P, Q)`` kernel(s), centre at ``(P//2, Q//2)``.
    shape : tuple of int
        Padded FFT shape ``(Ny, Nx)``: at least ``(max(H + P//2, P), max(W + Q//2, Q))``
        for images of ``H x W`` (see :func:`convolve`).

    Returns
    -------
    torch.Tensor
        Complex tensor ``(..., Ny, Nx//2 + 1)``.
    """
    return torch.fft.rfft2(psf, s=tuple(shape))


def _fft_length(n, p):
    """Shortest FFT length for which the circular convolution equals the linear one on the
    kept region ``[p//2, p//2 + n)`` of the full convolution: ``N >= n + p//2`` (aliases
    of the full result, of length ``n + p - 1``, then fall outside that region) and
    ``N >= p`` (room for the kernel)."""
    return good_fft_size(max(n + p // 2, p))


def fft_shape(h: int, w: int, p: int, q: int) -> tuple[int, int]:
    """The FFT grid on which an ``(h, w)`` image and a centred ``(p, q)`` kernel convolve.

    Parameters
    ----------
    h, w : int
        Image shape.
    p, q : int
        Kernel shape.

    Returns
    -------
    tuple of int
        Fast FFT lengths (:func:`~galgen.physics.good_fft_size`) of at least
        ``max(h + p//2, p)`` and ``max(w + q//2, q)``: enough that light wrapped around the
        periodic grid never lands inside the image.
    """
    return _fft_length(h, p), _fft_length(w, q)


def crop_kernel(psf: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Drop PSF pixels farther than ``h - 1`` (``w - 1``) from its centre.

    No light from inside an ``(h, w)`` image can reach the image through them, so the
    convolution is unchanged, and faster.

    Parameters
    ----------
    psf : torch.Tensor
        ``(..., P, Q)``, centre at ``(P//2, Q//2)``.
    h, w : int
        Image shape.

    Returns
    -------
    torch.Tensor
        The PSF, or a view of its central part.
    """
    p, q = psf.shape[-2:]
    cy, cx = p // 2, q // 2
    y0, y1 = max(cy - (h - 1), 0), min(cy + h, p)
    x0, x1 = max(cx - (w - 1), 0), min(cx + w, q)
    if (y0, y1, x0, x1) == (0, p, 0, q):
        return psf
    return psf[..., y0:y1, x0:x1]


def convolve(images: torch.Tensor, psf: torch.Tensor, *, transfer: torch.Tensor | None = None,
             check: bool = True) -> torch.Tensor:
    """Convolve images with a PSF, keeping the centring convention and the image shape.

    Parameters
    ----------
    images : torch.Tensor
        ``(H, W)`` or ``(B, H, W)`` floating tensor (float32 or float64, any device).
    psf : torch.Tensor
        ``(P, Q)`` kernel shared by all images, or ``(B, P, Q)`` one per image; its
        centre is at ``(P//2, Q//2)``. Any size relative to the images: the pixels of a
        kernel farther than ``H-1`` (``W-1``) from its centre cannot carry light from one
        image pixel to another and are dropped first (the result is unchanged).
    transfer : torch.Tensor, optional
        A precomputed :func:`psf_transfer` of ``psf`` at the padded shape this call
        uses, ``(good_fft_size(max(H + P//2, P)), good_fft_size(max(W + Q//2, Q)))``, to
        skip the PSF transform when the same PSF is reused.
    check : bool, optional
        Validate shapes and that the PSF is finite (a device sync on GPUs).

    Returns
    -------
    torch.Tensor
        Convolved images, same shape, dtype and device as ``images``; differentiable
        with respect to both ``images`` and ``psf``.

    Raises
    ------
    GalgenInputError
        Bad shapes, mismatched batch sizes, mismatched dtype/device, non-finite PSF.

    Examples
    --------
    >>> import torch
    >>> img = torch.zeros(9, 9, dtype=torch.float64); img[4, 4] = 1.0
    >>> psf = torch.tensor([[0., 1., 0.], [1., 4., 1.], [0., 1., 0.]], dtype=torch.float64) / 8
    >>> out = convolve(img, psf)
    >>> [round(v, 12) for v in (out[4, 4].item(), out[3, 4].item(), out.sum().item())]
    [0.5, 0.125, 1.0]
    """
    if check:
        _check_images(images)
        _check_images(psf, "psf")
        if images.ndim == 2 and psf.ndim == 3:
            raise GalgenInputError(f"psf: a batch of PSFs {tuple(psf.shape)} needs a batch of images, "
                                   f"got images {tuple(images.shape)}")
        if images.ndim == 3 and psf.ndim == 3 and psf.shape[0] != images.shape[0]:
            raise GalgenInputError(f"psf: batch size {psf.shape[0]} does not match images batch size "
                                   f"{images.shape[0]}")
        if psf.dtype != images.dtype or psf.device != images.device:
            raise GalgenInputError(f"psf: dtype/device {psf.dtype}/{psf.device} differ from images "
                                   f"{images.dtype}/{images.device}")
        if not bool(torch.isfinite(psf).all()):
            raise GalgenInputError("psf: contains NaN or inf")
    h, w = images.shape[-2:]
    psf = crop_kernel(psf, h, w)
    p, q = psf.shape[-2:]
    shape = fft_shape(h, w, p, q)
    if transfer is None:
        transfer = psf_transfer(psf, shape)
    elif check and (transfer.shape[-2] != shape[0] or transfer.shape[-1] != shape[1] // 2 + 1):
        raise GalgenInputError(f"transfer: shape {tuple(transfer.shape)} does not match the padded FFT "
                               f"shape {shape} of images {h}x{w} and psf {p}x{q}")
    full = torch.fft.irfft2(torch.fft.rfft2(images, s=shape) * transfer, s=shape)
    return full[..., p // 2:p // 2 + h, q // 2:q // 2 + w]


def pixelate(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Integrate fine pixels onto detector pixels: sum each ``factor x factor`` block.

    Detector pixel ``(i, j)`` receives fine pixels ``[i*factor, (i+1)*factor)`` along
    each axis, so a profile centred at the centre of the block of detector pixel
    ``(S//2, S//2)`` lands on that pixel (the oversampling convention).

    Parameters
    ----------
    images : torch.Tensor
        ``(..., H*factor, W*factor)`` images.
    factor : int
        Oversampling factor (>= 1).

    Returns
    -------
    torch.Tensor
        ``(..., H, W)``; flux is conserved.

    Examples
    --------
    >>> import torch
    >>> pixelate(torch.ones(6, 6), 3)
    tensor([[9., 9.],
            [9., 9.]])
    """
    k = int(factor)
    if k < 1:
        raise GalgenInputError(f"factor: oversampling must be >= 1, got {factor!r}")
    if k == 1:
        return images
    h, w = images.shape[-2:]
    if h % k or w % k:
        raise GalgenInputError(f"images: shape {h}x{w} is not a multiple of the oversampling {k}")
    return images.reshape(*images.shape[:-2], h // k, k, w // k, k).sum(dim=(-3, -1))
