"""Multichannel Wiener filtering: the EM algorithm of norbert / open-unmix `filtering.py`, in TF.

Complex values are carried as separate real and imaginary float32 tensors and the (1x1 or 2x2)
channel covariance matrices are inverted in closed form, so the graph is plain mul/add/div and
converts to TFLite builtins. Shapes (leading batch axes `...` are allowed everywhere):

    target magnitudes  (..., nb_frames, nb_bins, nb_channels, nb_sources)
    mixture STFT       (..., nb_frames, nb_bins, nb_channels, 2)            real/imag last
    estimates          (..., nb_frames, nb_bins, nb_channels, nb_sources, 2)

Each leading batch item is filtered on its own (its own scaling and spatial covariances), like
open-unmix's per-sample loop.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from models.transforms import Float32Layer, compiled_or_plain, in_tflite_graph, inverse_stft, istft, xla_allowed


def softmask(target_magnitudes, mix_stft, eps: float = 1e-10) -> tf.Tensor:
    """Ratio masks `v_j / (eps + sum_k v_k)` applied to the complex mixture (keeps the mixture phase)."""
    v = tf.convert_to_tensor(target_magnitudes, tf.float32)
    mix_stft = tf.convert_to_tensor(mix_stft, tf.float32)
    # divide_no_nan: where the sum is 0 every v_j is 0, so the mask is 0 as with eps > 0; a float16 TFLite
    # file stores eps = 1e-10 as 0 (below half precision), where a plain division would give 0 / 0 = NaN
    mask = tf.math.divide_no_nan(v, eps + tf.reduce_sum(v, axis=-1, keepdims=True))
    return mask[..., None] * mix_stft[..., None, :]


def wiener(target_magnitudes, mix_stft, niter: int = 1, residual: bool = False, eps: float = 1e-10,
           scale_factor: float = 10.0) -> tf.Tensor:
    """Source STFT estimates from magnitude estimates and the mixture STFT.

    niter == 0: soft (ratio) masks on the mixture, see `softmask`.
    niter > 0:  the magnitudes with the mixture phase initialise `niter` EM iterations of the
                multichannel Wiener filter (open-unmix's `wiener(softmask=False)`).
    residual:   append `mixture - sum(estimates)` as an extra last source before the EM.
    Returns `(..., nb_frames, nb_bins, nb_channels, nb_sources [+1], 2)`.
    """
    v = tf.convert_to_tensor(target_magnitudes, tf.float32)
    mix_stft = tf.convert_to_tensor(mix_stft, tf.float32)
    if niter > 0 and v.shape[-2] == 2 and in_tflite_graph():
        return _wiener_stereo_tflite(v, mix_stft, niter, residual, eps, scale_factor)
    if niter == 0:
        y = softmask(v, mix_stft, eps)
    else:
        mix_re, mix_im = mix_stft[..., 0], mix_stft[..., 1]
        mix_abs = tf.sqrt(tf.square(mix_re) + tf.square(mix_im))
        safe = tf.where(mix_abs > 0, mix_abs, tf.ones_like(mix_abs))
        cos = tf.where(mix_abs > 0, mix_re / safe, tf.ones_like(mix_abs))  # angle(0) = 0, like atan2
        sin = tf.where(mix_abs > 0, mix_im / safe, tf.zeros_like(mix_abs))
        y = tf.stack([v * cos[..., None], v * sin[..., None]], axis=-1)
    if residual:
        y = tf.concat([y, (mix_stft - tf.reduce_sum(y, axis=-2))[..., None, :]], axis=-2)
    if niter == 0:
        return y

    # scale down for numerical stability: the largest mixture magnitude becomes at most scale_factor
    max_abs = tf.reduce_max(tf.reduce_sum(tf.square(mix_stft), axis=-1), axis=[-3, -2, -1], keepdims=True)
    max_abs = tf.maximum(1.0, tf.sqrt(max_abs) / scale_factor)  # (..., 1, 1, 1)
    y = expectation_maximization(y / max_abs[..., None, None], mix_stft / max_abs[..., None], niter, eps)
    return y * max_abs[..., None, None]


def blockwise_wiener(target_magnitudes, mix_stft, win_len: int, niter: int = 1, residual: bool = False,
                     eps: float = 1e-10, scale_factor: float = 10.0) -> tf.Tensor:
    """`wiener` on consecutive blocks of `win_len` frames, each filtered on its own (own scaling and
    spatial covariances), as open-unmix's `Separator(wiener_win_len=...)`; `win_len` 0 = one block.

    Inputs `(B, F, K, C, J)` and `(B, F, K, C, 2)`. The frames are zero-padded to whole blocks:
    silent frames add nothing to the covariance sums or the scaling maximum and come out silent,
    so every block equals open-unmix's filtering of the same frames; the padding is cut off after.
    """
    if not win_len:
        return wiener(target_magnitudes, mix_stft, niter, residual, eps, scale_factor)
    v = tf.convert_to_tensor(target_magnitudes, tf.float32)
    mix_stft = tf.convert_to_tensor(mix_stft, tf.float32)
    nb_frames = tf.shape(v)[1]
    y = wiener(_frame_blocks(v, win_len), _frame_blocks(mix_stft, win_len), niter, residual, eps,
               scale_factor)  # (B, blocks, win, K, C, J', 2)
    y = tf.reshape(y, tf.concat([tf.shape(y)[:1], [-1], tf.shape(y)[3:]], 0))
    return y[:, :nb_frames]


def expectation_maximization(y, mix_stft, niter: int = 2, eps: float = 1e-10) -> tf.Tensor:
    """`niter` EM updates of the source estimates `y` `(..., F, K, C, J, 2)` given the mixture `(..., F, K, C, 2)`.

    Per iteration: PSDs `v_j = mean_c |y_jc|^2`; spatial covariances
    `R_j = sum_t y_j y_j^H / (eps + sum_t v_j)` per bin; mixture covariance
    `Cxx = sqrt(eps) I + sum_j v_j R_j`; new estimates `y_j = v_j R_j Cxx^-1 x`.
    """
    nb_channels = y.shape[-3]
    if nb_channels not in (1, 2):
        raise ValueError(f"Wiener filtering supports 1 or 2 channels, got {nb_channels}")
    if nb_channels == 2:
        return _expectation_maximization_stereo(y, mix_stft, niter, eps)
    x_re, x_im = mix_stft[..., 0], mix_stft[..., 1]  # (..., F, K, C)
    y_re, y_im = y[..., 0], y[..., 1]  # (..., F, K, C, J)
    regularization = tf.sqrt(tf.constant(eps, tf.float32)) * tf.eye(nb_channels)
    for _ in range(niter):
        v = tf.reduce_mean(tf.square(y_re) + tf.square(y_im), axis=-2)  # (..., F, K, J)
        # R_j[k, a, b] = sum_t y_a conj(y_b) / (eps + sum_t v)
        weight = eps + tf.reduce_sum(v, axis=-3)  # (..., K, J)
        # divide_no_nan: a zero weight has zero sums above it (see `softmask`)
        r_re = tf.math.divide_no_nan(tf.einsum("...fkaj,...fkbj->...kabj", y_re, y_re)
                                     + tf.einsum("...fkaj,...fkbj->...kabj", y_im, y_im), weight[..., None, None, :])
        r_im = tf.math.divide_no_nan(tf.einsum("...fkaj,...fkbj->...kabj", y_im, y_re)
                                     - tf.einsum("...fkaj,...fkbj->...kabj", y_re, y_im), weight[..., None, None, :])
        # Cxx[f, k] = reg + sum_j v_j R_j   (..., F, K, C, C)
        c_re = regularization + tf.einsum("...fkj,...kabj->...fkab", v, r_re)
        c_im = tf.einsum("...fkj,...kabj->...fkab", v, r_im)
        inv_re, inv_im = _invert(c_re, c_im)
        # z = Cxx^-1 x, then y_j = v_j R_j z  (same as the gain v_j R_j Cxx^-1 applied to x)
        z_re = tf.einsum("...ab,...b->...a", inv_re, x_re) - tf.einsum("...ab,...b->...a", inv_im, x_im)
        z_im = tf.einsum("...ab,...b->...a", inv_re, x_im) + tf.einsum("...ab,...b->...a", inv_im, x_re)
        y_re = v[..., None, :] * (tf.einsum("...kabj,...fkb->...fkaj", r_re, z_re)
                                  - tf.einsum("...kabj,...fkb->...fkaj", r_im, z_im))
        y_im = v[..., None, :] * (tf.einsum("...kabj,...fkb->...fkaj", r_re, z_im)
                                  + tf.einsum("...kabj,...fkb->...fkaj", r_im, z_re))
    return tf.stack([y_re, y_im], axis=-1)


def _expectation_maximization_stereo(y, mix_stft, niter: int, eps: float) -> tf.Tensor:
    """`expectation_maximization` for two channels, written out element by element.

    The spatial covariances R_j and the mixture covariance Cxx are Hermitian 2x2 matrices, so only
    their diagonals (real) and one off-diagonal entry (complex) are computed, and Cxx^-1 has a real
    determinant. Same numbers as the general einsum form, but plain elementwise ops on `(F, K, J)`
    tensors: about 4x faster on CPU than einsums with 2x2 inner dimensions, and TFLite-friendly.
    """
    x0_re, x0_im, x1_re, x1_im = (mix_stft[..., 0, 0], mix_stft[..., 0, 1],  # (..., F, K)
                                  mix_stft[..., 1, 0], mix_stft[..., 1, 1])
    y0_re, y0_im = y[..., 0, :, 0], y[..., 0, :, 1]  # (..., F, K, J)
    y1_re, y1_im = y[..., 1, :, 0], y[..., 1, :, 1]
    regularization = tf.sqrt(tf.constant(eps, tf.float32))
    for _ in range(niter):
        p0 = tf.square(y0_re) + tf.square(y0_im)
        p1 = tf.square(y1_re) + tf.square(y1_im)
        v = 0.5 * (p0 + p1)  # (..., F, K, J)
        weight = eps + tf.reduce_sum(v, axis=-3)  # (..., K, J)
        # R_j = sum_t y y^H / weight: r00, r11 real; r01 = sum_t y0 conj(y1) / weight; r10 = conj(r01)
        # divide_no_nan: a zero weight has zero sums above it (see `softmask`)
        r00 = tf.math.divide_no_nan(tf.reduce_sum(p0, axis=-3), weight)
        r11 = tf.math.divide_no_nan(tf.reduce_sum(p1, axis=-3), weight)
        r01_re = tf.math.divide_no_nan(tf.reduce_sum(y0_re * y1_re + y0_im * y1_im, axis=-3), weight)
        r01_im = tf.math.divide_no_nan(tf.reduce_sum(y0_im * y1_re - y0_re * y1_im, axis=-3), weight)
        r00, r11, r01_re, r01_im = (r[..., None, :, :] for r in (r00, r11, r01_re, r01_im))  # (..., 1, K, J)
        # Cxx = reg I + sum_j v_j R_j (Hermitian), its inverse via the real determinant
        c00 = regularization + tf.reduce_sum(v * r00, axis=-1)  # (..., F, K)
        c11 = regularization + tf.reduce_sum(v * r11, axis=-1)
        c01_re = tf.reduce_sum(v * r01_re, axis=-1)
        c01_im = tf.reduce_sum(v * r01_im, axis=-1)
        det = c00 * c11 - (tf.square(c01_re) + tf.square(c01_im))
        # z = Cxx^-1 x = [c11 x0 - c01 x1, c00 x1 - conj(c01) x0] / det
        z0_re = (c11 * x0_re - (c01_re * x1_re - c01_im * x1_im)) / det
        z0_im = (c11 * x0_im - (c01_re * x1_im + c01_im * x1_re)) / det
        z1_re = (c00 * x1_re - (c01_re * x0_re + c01_im * x0_im)) / det
        z1_im = (c00 * x1_im - (c01_re * x0_im - c01_im * x0_re)) / det
        z0_re, z0_im, z1_re, z1_im = (z[..., None] for z in (z0_re, z0_im, z1_re, z1_im))  # (..., F, K, 1)
        # y_j = v_j R_j z: [r00 z0 + r01 z1, conj(r01) z0 + r11 z1]
        y0_re = v * (r00 * z0_re + r01_re * z1_re - r01_im * z1_im)
        y0_im = v * (r00 * z0_im + r01_re * z1_im + r01_im * z1_re)
        y1_re = v * (r01_re * z0_re + r01_im * z0_im + r11 * z1_re)
        y1_im = v * (r01_re * z0_im - r01_im * z0_re + r11 * z1_im)
    channel0 = tf.stack([y0_re, y0_im], axis=-1)  # (..., F, K, J, 2)
    channel1 = tf.stack([y1_re, y1_im], axis=-1)
    return tf.stack([channel0, channel1], axis=-3)  # (..., F, K, C, J, 2)



def _wiener_stereo_tflite(v, mix_stft, niter: int, residual: bool, eps: float, scale_factor: float) -> tf.Tensor:
    """`wiener` (niter > 0, two channels) for graphs traced inside `tflite_graph()`: same numbers, other layout.

    TFLite runs each op on its own, so what costs is data movement, not arithmetic: slicing a channel or
    the real part out of `(..., C, J, 2)` (a STRIDED_SLICE with a shrunk axis, which XNNPACK does not take)
    took ~8 ms per slice at UMX-HQ's 3 s chunk, stacking the parts back ~9 ms, and products broadcasting a
    `(F, K, 1)` factor over the last axis 4x a same-shape product. Here every real/imaginary part of every
    channel is one `(*lead, J, F, K)` tensor (bins last), cut out by one transpose at the start and put back
    by one at the end; per-bin covariances `(*lead, J, 1, K)` and per-frame-and-bin quantities
    `(*lead, 1, F, K)` then broadcast over contiguous bins, and the sums over frames and targets are reductions
    XNNPACK runs. The EM is `_expectation_maximization_stereo`'s; the scaling is folded into the magnitudes
    and into `z` (a `(F, K)` tensor) instead of the `(F, K, C, J, 2)` estimates.
    Inputs `(*lead, F, K, C, J)`, `(*lead, F, K, C, 2)` -> `(*lead, F, K, C, J [+1], 2)`.
    """
    nb_lead = v.shape.rank - 4
    lead = list(range(nb_lead))
    f_axis, k_axis, c_axis, j_axis = nb_lead, nb_lead + 1, nb_lead + 2, nb_lead + 3
    # component-major, bins last: magnitudes (C, *lead, J, F, K), mixture (C * 2, *lead, 1, F, K)
    m0, m1 = tf.split(tf.transpose(v, [c_axis] + lead + [j_axis, f_axis, k_axis]), 2, axis=0)
    mix = tf.transpose(mix_stft, [c_axis, j_axis] + lead + [f_axis, k_axis])  # (C, 2, *lead, F, K)
    mix = tf.expand_dims(tf.reshape(mix, tf.concat([[4], tf.shape(mix)[2:]], 0)), -3)
    x0_re, x0_im, x1_re, x1_im = tf.split(mix, 4, axis=0)  # (1, *lead, 1, F, K)

    # the scaling of `wiener`: the largest mixture magnitude of each leading item becomes at most scale_factor
    energy0 = tf.square(x0_re) + tf.square(x0_im)
    energy1 = tf.square(x1_re) + tf.square(x1_im)
    max_abs = tf.reduce_max(tf.maximum(energy0, energy1), axis=[-2, -1], keepdims=True)  # (1, *lead, 1, 1, 1)
    scale = tf.maximum(1.0, tf.sqrt(max_abs) / scale_factor)
    inv_scale = 1.0 / scale
    # initial estimates: the magnitudes with the mixture phase (angle(0) = 0, like atan2), scaled
    # where |x| = 0 so are its parts: the unit phasor's 1 / |x| may be anything finite there, and cos = 1
    silent0, silent1 = tf.cast(energy0 <= 0, tf.float32), tf.cast(energy1 <= 0, tf.float32)
    unit0 = inv_scale / (tf.sqrt(energy0) + silent0)
    unit1 = inv_scale / (tf.sqrt(energy1) + silent1)
    cos0 = x0_re * unit0 + inv_scale * silent0
    cos1 = x1_re * unit1 + inv_scale * silent1
    y0_re, y0_im, y1_re, y1_im = m0 * cos0, m0 * (x0_im * unit0), m1 * cos1, m1 * (x1_im * unit1)
    x0_re, x0_im, x1_re, x1_im = (x * inv_scale for x in (x0_re, x0_im, x1_re, x1_im))
    if residual:  # mixture minus the sum of the estimates, one more target (axis J)
        y0_re, y0_im, y1_re, y1_im = (
            tf.concat([y, x - tf.reduce_sum(y, axis=-3, keepdims=True)], axis=-3)
            for y, x in ((y0_re, x0_re), (y0_im, x0_im), (y1_re, x1_re), (y1_im, x1_im)))

    regularization = tf.sqrt(tf.constant(eps, tf.float32))
    for iteration in range(niter):
        p0 = tf.square(y0_re) + tf.square(y0_im)  # (1, *lead, J, F, K)
        p1 = tf.square(y1_re) + tf.square(y1_im)
        psd = 0.5 * (p0 + p1)
        weight = eps + tf.reduce_sum(psd, axis=-2, keepdims=True)  # (1, *lead, J, 1, K)
        # spatial covariances R_j per bin, stacked on axis 0: r00, r11 (real), r01 (complex); r10 = conj(r01)
        sums = tf.concat([tf.reduce_sum(p0, axis=-2, keepdims=True), tf.reduce_sum(p1, axis=-2, keepdims=True),
                          tf.reduce_sum(y0_re * y1_re + y0_im * y1_im, axis=-2, keepdims=True),
                          tf.reduce_sum(y0_im * y1_re - y0_re * y1_im, axis=-2, keepdims=True)], axis=0)
        weighted = psd * tf.math.divide_no_nan(sums, weight)  # v_j R_j: (4, *lead, J, F, K)
        r00, r11, r01_re, r01_im = tf.split(weighted, 4, axis=0)
        # Cxx = reg I + sum_j v_j R_j (Hermitian), its inverse via the real determinant
        c00, c11, c01_re, c01_im = tf.split(tf.reduce_sum(weighted, axis=nb_lead + 1, keepdims=True), 4, axis=0)
        c00, c11 = c00 + regularization, c11 + regularization
        # z = Cxx^-1 x; the last iteration's z also undoes the scaling of the estimates
        inv_det = (scale if iteration == niter - 1 else 1.0) / (c00 * c11 - (tf.square(c01_re) + tf.square(c01_im)))
        z0_re = (c11 * x0_re - (c01_re * x1_re - c01_im * x1_im)) * inv_det
        z0_im = (c11 * x0_im - (c01_re * x1_im + c01_im * x1_re)) * inv_det
        z1_re = (c00 * x1_re - (c01_re * x0_re + c01_im * x0_im)) * inv_det
        z1_im = (c00 * x1_im - (c01_re * x0_im - c01_im * x0_re)) * inv_det
        # y_j = v_j R_j z: [r00 z0 + r01 z1, conj(r01) z0 + r11 z1] (r.. here already times v_j)
        y0_re = r00 * z0_re + r01_re * z1_re - r01_im * z1_im
        y0_im = r00 * z0_im + r01_re * z1_im + r01_im * z1_re
        y1_re = r01_re * z0_re + r01_im * z0_im + r11 * z1_re
        y1_im = r01_re * z0_im - r01_im * z0_re + r11 * z1_im
    # (C * 2, *lead, J, F, K) -> (*lead, F, K, C, J, 2)
    stacked = tf.concat([y0_re, y0_im, y1_re, y1_im], axis=0)
    stacked = tf.reshape(stacked, tf.concat([[2, 2], tf.shape(stacked)[1:]], 0))
    return tf.transpose(stacked, [2 + axis for axis in lead] + [nb_lead + 3, nb_lead + 4, 0, nb_lead + 2, 1])


def _invert(m_re, m_im):
    """Closed-form inverse of complex 1x1 or 2x2 matrices `(..., C, C)` given as real/imag parts."""
    if m_re.shape[-1] == 1:
        det = tf.square(m_re) + tf.square(m_im)
        return m_re / det, -m_im / det
    a_re, b_re, c_re, d_re = m_re[..., 0, 0], m_re[..., 0, 1], m_re[..., 1, 0], m_re[..., 1, 1]
    a_im, b_im, c_im, d_im = m_im[..., 0, 0], m_im[..., 0, 1], m_im[..., 1, 0], m_im[..., 1, 1]
    det_re = a_re * d_re - a_im * d_im - (b_re * c_re - b_im * c_im)
    det_im = a_re * d_im + a_im * d_re - (b_re * c_im + b_im * c_re)
    norm = tf.square(det_re) + tf.square(det_im)
    inv_det_re, inv_det_im = det_re / norm, -det_im / norm

    def times_inv_det(p_re, p_im):
        return p_re * inv_det_re - p_im * inv_det_im, p_re * inv_det_im + p_im * inv_det_re

    e00 = times_inv_det(d_re, d_im)
    e01 = times_inv_det(-b_re, -b_im)
    e10 = times_inv_det(-c_re, -c_im)
    e11 = times_inv_det(a_re, a_im)
    inv_re = tf.stack([tf.stack([e00[0], e01[0]], -1), tf.stack([e10[0], e11[0]], -1)], -2)
    inv_im = tf.stack([tf.stack([e00[1], e01[1]], -1), tf.stack([e10[1], e11[1]], -1)], -2)
    return inv_re, inv_im


# ------------------------------------------------------------------- one EM iteration, fused with the ISTFT
# The server separator's path (stereo, one EM iteration). The first iteration starts from the magnitudes
# with the mixture phase, y_jc = v_jc exp(i angle(x_c)), so its statistics need no complex estimates:
# |y_jc|^2 = v_jc^2 and y_j0 conj(y_j1) = v_j0 v_j1 u with u = exp(i (angle x_0 - angle x_1)). The
# filter then runs as one XLA pass for the statistics and one per source that writes that source's STFT
# in the ISTFT's layout and inverts it; the sources' passes are independent ops on separate cores.
# The magnitudes come targets first, `(J, F, B, C, K)` (`StackedOpenUnmix(targets_first=True)`, the
# networks' own layout): one source's magnitudes are then contiguous runs of bins, not every J-th float.


def _frame_blocks(x, win_len: int):
    """Axis 1 (frames) `(A, F, ...)` -> `(A, nb_blocks, win_len, ...)`, zero-padded to whole blocks; 0: one block."""
    if not win_len:
        return x[:, None]
    nb_frames = tf.shape(x)[1]
    nb_blocks = (nb_frames + win_len - 1) // win_len
    x = tf.pad(x, [[0, 0], [0, nb_blocks * win_len - nb_frames]] + [[0, 0]] * (len(x.shape) - 2))
    return tf.reshape(x, tf.concat([tf.shape(x)[:1], [nb_blocks, win_len], tf.shape(x)[2:]], 0))


def _blocked_inputs(target_magnitudes, mix_stft, win_len: int, residual: bool):
    """-> per channel the sources' amplitudes `(J', blocks, win, B, K)` of `y_jc = amplitude_jc exp(i angle(x_c))`
    (the residual's is |x_c| - sum_j v_jc, signed) and the mixture's real and imaginary parts `(blocks, win, B, K)`."""
    v = _frame_blocks(tf.convert_to_tensor(target_magnitudes, tf.float32), win_len)  # (J, blocks, win, B, C, K)
    x = _frame_blocks(tf.convert_to_tensor(mix_stft, tf.float32), win_len)  # (B, blocks, win, K, C, 2)
    x = tf.transpose(x, [4, 5, 1, 2, 0, 3])  # (C, 2, blocks, win, B, K)
    amplitudes = []
    for channel in range(2):
        amplitude = v[..., channel, :]
        if residual:
            magnitude = tf.sqrt(tf.square(x[channel, 0]) + tf.square(x[channel, 1]))
            amplitude = tf.concat([amplitude, (magnitude - tf.reduce_sum(amplitude, 0))[None]], 0)
        amplitudes.append(amplitude)
    return amplitudes, x


def first_em_statistics(target_magnitudes, mix_stft, win_len: int = 0, residual: bool = False, eps: float = 1e-10,
                        scale_factor: float = 10.0):
    """What every source's first EM update shares, stereo. Magnitudes `(J, F, B, 2, K)` (targets first), mixture
    `(B, F, K, 2, 2)` ->

    scale   `(blocks, 1, B, 1)`         the mixture is divided by it (`wiener`'s scaling)
    spatial `(4, J', blocks, B, K)`     R_j's r00, r11, Re r01, Im r01 (`_expectation_maximization_stereo`)
    z       `(4, blocks, win, B, K)`    Re z0, Im z0, Re z1, Im z1 with z = Cxx^-1 x / scale

    Blocks of `win_len` frames as `blockwise_wiener` (0: one block of all frames). The same numbers as
    `wiener(niter=1)` up to float32 rounding (|cos|^2 + |sin|^2 = 1 is not computed).
    """
    (a, b), x = _blocked_inputs(target_magnitudes, mix_stft, win_len, residual)  # a, b: (J', blocks, win, B, K)
    x0_re, x0_im, x1_re, x1_im = x[0, 0], x[0, 1], x[1, 0], x[1, 1]  # (blocks, win, B, K)
    power = tf.maximum(tf.square(x0_re) + tf.square(x0_im), tf.square(x1_re) + tf.square(x1_im))
    scale = tf.maximum(1.0, tf.sqrt(tf.reduce_max(power, axis=[1, 3], keepdims=True)) / scale_factor)

    def unit(re, im):  # exp(i angle), angle(0) = 0 like atan2
        magnitude = tf.sqrt(tf.square(re) + tf.square(im))
        safe = tf.where(magnitude > 0, magnitude, tf.ones_like(magnitude))
        return (tf.where(magnitude > 0, re / safe, tf.ones_like(magnitude)),
                tf.where(magnitude > 0, im / safe, tf.zeros_like(magnitude)))

    cos0, sin0 = unit(x0_re, x0_im)
    cos1, sin1 = unit(x1_re, x1_im)
    u_re, u_im = cos0 * cos1 + sin0 * sin1, sin0 * cos1 - cos0 * sin1
    # sums of the unscaled products, divided by scale^2 after: XLA reads the magnitudes where they are
    # instead of writing a scaled copy; the four sums over frames as one reduction (XLA materialises a
    # reduction's input: one array, not four)
    p0, p1, ab = tf.square(a), tf.square(b), a * b  # (J', blocks, win, B, K)
    sums = tf.reduce_sum(tf.stack([p0, p1, ab * u_re, ab * u_im]), axis=3) / tf.square(scale[:, 0])
    weight = eps + 0.5 * (sums[0] + sums[1])  # (J', blocks, B, K)
    # divide_no_nan: a zero weight has zero sums above it (see `softmask`)
    spatial = tf.math.divide_no_nan(sums, weight)  # r00, r11, Re r01, Im r01: (4, J', blocks, B, K)
    # Cxx = reg I + sum_j v_j R_j, the four entries on a last axis: one pass over the magnitudes for all four
    psd = (0.5 * (p0 + p1))[..., None]  # (J', blocks, win, B, K, 1), times scale^2
    covariance = tf.reduce_sum(psd * tf.transpose(spatial, [1, 2, 3, 4, 0])[:, :, None], axis=0) \
        / tf.square(scale)[..., None]  # (blocks, win, B, K, 4)
    regularization = tf.sqrt(tf.constant(eps, tf.float32))
    c00, c11 = covariance[..., 0] + regularization, covariance[..., 1] + regularization
    c01_re, c01_im = covariance[..., 2], covariance[..., 3]
    det = c00 * c11 - (tf.square(c01_re) + tf.square(c01_im))
    x0_re, x0_im, x1_re, x1_im = (part / scale for part in (x0_re, x0_im, x1_re, x1_im))
    z = tf.stack([(c11 * x0_re - (c01_re * x1_re - c01_im * x1_im)) / det,
                  (c11 * x0_im - (c01_re * x1_im + c01_im * x1_re)) / det,
                  (c00 * x1_re - (c01_re * x0_re + c01_im * x0_im)) / det,
                  (c00 * x1_im - (c01_re * x0_im - c01_im * x0_re)) / det])
    return scale, spatial, z


def first_em_source(target_magnitudes, mix_stft, scale, spatial, z, index: int, win_len: int = 0,
                    residual: bool = False) -> tf.Tensor:
    """Source `index`'s first EM estimate `y_j = v_j R_j z` (times the scale), stereo, as complex frames
    `(B, 2, F, K)` (the ISTFT's layout); inputs and options as `first_em_statistics`, then its outputs."""
    nb_frames = tf.shape(target_magnitudes)[1]
    if residual and index == target_magnitudes.shape[0]:
        (a, b), _ = _blocked_inputs(target_magnitudes, mix_stft, win_len, residual)
        a, b = a[index], b[index]
    else:  # this source's magnitudes only
        (a, b), _ = _blocked_inputs(target_magnitudes[index:index + 1], mix_stft, win_len, False)
        a, b = a[0], b[0]
    a, b = a / scale, b / scale  # (blocks, win, B, K)
    psd = 0.5 * (tf.square(a) + tf.square(b)) * scale  # times the scale the output gets back
    r00, r11, r01_re, r01_im = (r[:, None] for r in tf.unstack(spatial[:, index]))  # (blocks, 1, B, K)
    z0_re, z0_im, z1_re, z1_im = tf.unstack(z)
    # y_j = v_j R_j z: [r00 z0 + r01 z1, conj(r01) z0 + r11 z1]
    parts = [psd * (r00 * z0_re + r01_re * z1_re - r01_im * z1_im),
             psd * (r00 * z0_im + r01_re * z1_im + r01_im * z1_re),
             psd * (r01_re * z0_re + r01_im * z0_im + r11 * z1_re),
             psd * (r01_re * z0_im - r01_im * z0_re + r11 * z1_im)]
    shape = tf.shape(parts[0])
    parts = [tf.transpose(tf.reshape(part, tf.concat([[-1], shape[2:]], 0))[:nb_frames], [1, 0, 2])
             for part in parts]  # (B, F, K)
    return tf.complex(tf.stack(parts[0::2], axis=1), tf.stack(parts[1::2], axis=1))


@keras.saving.register_keras_serializable(package="musicsep")
class WienerFilter(Float32Layer):
    """[target magnitudes `(B, F, K, C, J)`, mixture STFT `(B, F, K, C, 2)`] -> `(B, F, K, C, J [+1], 2)`."""

    def __init__(self, niter: int = 1, residual: bool = False, eps: float = 1e-10, scale_factor: float = 10.0,
                 win_len: int = 0, jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.niter = niter
        self.residual = residual
        self.eps = eps
        self.scale_factor = scale_factor
        self.win_len = win_len  # frames per independently filtered block; 0: the whole input
        # XLA fuses the EM's ~100 elementwise passes over (frames, bins, sources) tensors: ~3x faster on CPU.
        # In-process graphs only: TFLite and `without_xla` graphs (TF Serving) get the plain ops
        self.jit_compile = jit_compile
        self._compiled = tf.function(blockwise_wiener, jit_compile=True) if jit_compile else None

    def call(self, target_magnitudes, mix_stft):
        filter_fn = self._compiled if self._compiled is not None and xla_allowed() else blockwise_wiener
        return filter_fn(target_magnitudes, mix_stft, self.win_len, self.niter, self.residual, self.eps,
                         self.scale_factor)

    def compute_output_shape(self, target_magnitudes_shape, mix_stft_shape):
        shape = tuple(target_magnitudes_shape)
        nb_sources = shape[-1] + 1 if self.residual and shape[-1] is not None else shape[-1]
        return shape[:-1] + (nb_sources, 2)

    def get_config(self):
        return {**super().get_config(), "niter": self.niter, "residual": self.residual, "eps": self.eps,
                "scale_factor": self.scale_factor, "win_len": self.win_len, "jit_compile": self.jit_compile}


@keras.saving.register_keras_serializable(package="musicsep")
class WienerISTFT(Float32Layer):
    """The server separator after its networks: [target magnitudes `(J, F, B, C, K)` (targets first, see
    `first_em_statistics`), mixture STFT
    `(B, F, K, C, 2)`, mixture waveform `(B, T, C)`] -> one waveform `(B, T, C)` per source (J [+1]).

    `WienerFilter(jit_compile=True)` then `transforms.ISTFT`, with the same numbers. Stereo with one EM
    iteration (open-unmix's default) runs fused: `first_em_statistics` as one XLA function, then per source
    one XLA function from its estimate to its waveform (`first_em_source`, `transforms.inverse_stft`); the
    sources' functions are independent ops that TensorFlow runs on separate cores. Other settings run
    `blockwise_wiener` (XLA) and `istft`. Inside `transforms.without_xla` (the serving SavedModel) the same
    functions are traced plain: no function must be XLA-compiled. TFLite converts neither.
    """

    def __init__(self, niter: int = 1, residual: bool = False, eps: float = 1e-10, scale_factor: float = 10.0,
                 win_len: int = 0, n_fft: int = 4096, hop_length: int = 1024, center: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.niter = niter
        self.residual = residual
        self.eps = eps
        self.scale_factor = scale_factor
        self.win_len = win_len
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.center = center
        self._statistics = compiled_or_plain(self._statistics_fn)
        self._source = compiled_or_plain(self._source_fn)
        self._filter = compiled_or_plain(blockwise_wiener)

    def _statistics_fn(self, target_magnitudes, mix_stft):
        return first_em_statistics(target_magnitudes, mix_stft, self.win_len, self.residual, self.eps,
                                   self.scale_factor)

    def _source_fn(self, target_magnitudes, mix_stft, scale, spatial, z, reference, index):
        # the length is the reference's: static inside the XLA function whatever the graph outside knows
        spectrum = first_em_source(target_magnitudes, mix_stft, scale, spatial, z, index, self.win_len, self.residual)
        waveform = inverse_stft(spectrum, self.n_fft, self.hop_length, tf.shape(reference)[1], self.center)
        return tf.transpose(waveform, [0, 2, 1])  # (B, T, C)

    def call(self, target_magnitudes, mix_stft, reference):
        nb_sources = target_magnitudes.shape[0] + int(self.residual)
        if target_magnitudes.shape[-2] == 2 and self.niter == 1:
            scale, spatial, z = self._statistics(target_magnitudes, mix_stft)
            nb_targets = target_magnitudes.shape[0]
            # every target through one function of its own magnitudes (one XLA compilation, not one per
            # target); the residual needs all of them
            return [self._source(target_magnitudes[index:index + 1], mix_stft, scale, spatial[:, index:index + 1], z,
                                 reference, 0) if index < nb_targets else
                    self._source(target_magnitudes, mix_stft, scale, spatial, z, reference, index)
                    for index in range(nb_sources)]
        magnitudes = tf.transpose(target_magnitudes, [2, 1, 4, 3, 0])  # (B, F, K, C, J)
        sources = self._filter(magnitudes, mix_stft, self.win_len, self.niter, self.residual, self.eps,
                               self.scale_factor)
        length = reference.shape[1] if reference.shape[1] is not None else tf.shape(reference)[1]
        waveforms = istft(sources, self.n_fft, self.hop_length, length, self.center)  # (B, T, C, J')
        return [waveforms[..., index] for index in range(nb_sources)]

    def compute_output_shape(self, target_magnitudes_shape, mix_stft_shape, reference_shape):
        nb_sources = target_magnitudes_shape[0] + int(self.residual)
        return [tuple(reference_shape)] * nb_sources

    def get_config(self):
        return {**super().get_config(), "niter": self.niter, "residual": self.residual, "eps": self.eps,
                "scale_factor": self.scale_factor, "win_len": self.win_len, "n_fft": self.n_fft,
                "hop_length": self.hop_length, "center": self.center}
