"""Fused optimizer update kernels: one pass over memory per array per step.

Every kernel works on 1-D C-contiguous arrays of one dtype (the caller ravels) and
writes into output arrays the caller allocated; inputs are only read. Scalars arrive
already cast to the arrays' dtype, so float32 work stays float32. The operation order
follows torch.optim's single-tensor CPU code (e.g. ``p + (-lr*g)/d`` as ``p - (lr*g)/d``)
so the results agree to rounding. Everything is elementwise, so parallel builds are
race-free and give bit-identical results to the serial builds.

Symbols: ``p`` parameter, ``g`` gradient, ``n = p.size``; every array below is ``(n,)``.
"""
import numpy as np
from numba import prange

from .. import config
from .._jit import dual, jit


@jit(inline="always")
def _lerp(a, b, w, one):
    """torch.lerp: ``a + w (b - a)`` for ``|w| < 0.5``, else ``b - (b - a)(1 - w)``."""
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (one - w)


@dual("optim")
def sgd_step(p, g, lr, wd, p_out):
    """Plain SGD.  ``g' = g + wd·p``;  ``p_out = p - lr·g'``."""
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        p_out[i] = p[i] - lr * gi


@dual("optim")
def sgd_momentum_step(p, g, buf, lr, wd, momentum, one_minus_dampening, nesterov, first,
                      p_out, buf_out):
    """SGD with momentum (torch.optim.SGD).

    ``g' = g + wd·p``;  ``b = g'`` on the first step (``first``), else
    ``b = momentum·buf + (1 - dampening)·g'``;  ``d = g' + momentum·b`` if ``nesterov``
    else ``d = b``;  ``p_out = p - lr·d``;  ``buf_out = b``.
    """
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        if first:
            b = gi
        else:
            b = buf[i] * momentum + one_minus_dampening * gi
        buf_out[i] = b
        if nesterov:
            d = gi + momentum * b
        else:
            d = b
        p_out[i] = p[i] - lr * d


@dual("optim")
def adagrad_step(p, g, s, clr, wd, eps, p_out, s_out):
    """Adagrad.  ``g' = g + wd·p``;  ``s_out = s + g'²``;
    ``p_out = p - clr·g' / (sqrt(s_out) + eps)``.
    """
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s_out[i] = si
        p_out[i] = p[i] - clr * gi / (np.sqrt(si) + eps)


@dual("optim")
def rmsprop_step(p, g, sq, ga, buf, lr, alpha, one_minus_alpha, eps, wd, momentum, centered,
                 p_out, sq_out, ga_out, buf_out):
    """RMSprop (torch.optim.RMSprop). ``ga``/``ga_out`` are read/written only when
    ``centered``, ``buf``/``buf_out`` only when ``momentum > 0`` (pass empty arrays otherwise).

    ``g' = g + wd·p``;  ``sq_out = alpha·sq + (1 - alpha)·g'²``;
    centered: ``ga_out = lerp(ga, g', 1 - alpha)``, ``v = sq_out - ga_out²``; else ``v = sq_out``;
    ``d = sqrt(v) + eps``;  momentum: ``buf_out = momentum·buf + g'/d``,
    ``p_out = p - lr·buf_out``;  else ``p_out = p - lr·g'/d``.
    """
    one = p.dtype.type(1)
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        v = sq[i] * alpha + one_minus_alpha * gi * gi
        sq_out[i] = v
        if centered:
            a = _lerp(ga[i], gi, one_minus_alpha, one)
            ga_out[i] = a
            v = v - a * a
        d = np.sqrt(v) + eps
        if momentum > 0:
            b = buf[i] * momentum + gi / d
            buf_out[i] = b
            p_out[i] = p[i] - lr * b
        else:
            p_out[i] = p[i] - lr * gi / d


@dual("optim")
def adam_step(p, g, m, v, vmax, decay, wd, one_minus_beta1, beta2, one_minus_beta2, eps,
              step_size, bc2_sqrt, amsgrad, p_out, m_out, v_out, vmax_out):
    """Adam / AdamW (torch.optim.Adam, AdamW). ``vmax``/``vmax_out`` are used only when
    ``amsgrad`` (pass empty arrays otherwise).

    ``g' = g + wd·p`` (Adam's coupled decay; AdamW passes ``wd = 0``);
    ``m_out = lerp(m, g', 1 - beta1)``;  ``v_out = beta2·v + (1 - beta2)·g'²``;
    ``u = max(vmax, v_out)`` (also stored in ``vmax_out``) if ``amsgrad`` else ``v_out``;
    ``p_out = decay·p - step_size·m_out / (sqrt(u)/bc2_sqrt + eps)``, where the caller passes
    ``step_size = lr/(1 - beta1^t)``, ``bc2_sqrt = sqrt(1 - beta2^t)`` and
    ``decay = 1 - lr·weight_decay`` for AdamW (``1`` for Adam).
    """
    one = p.dtype.type(1)
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        mi = _lerp(m[i], gi, one_minus_beta1, one)
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m_out[i] = mi
        v_out[i] = vi
        if amsgrad:
            vm = vmax[i]
            if vm > vi or vm != vm:  # torch.maximum: NaN propagates
                vi = vm
            vmax_out[i] = vi
        p_out[i] = p[i] * decay - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)


@dual("optim")
def sum_squares(x, chunk, partial):
    """Partial sums of squares in float64: ``partial[c] = Σ x[i]²`` over
    ``i ∈ [c·chunk, (c+1)·chunk)``; ``x (n,)``, ``partial (ceil(n/chunk),)`` float64.

    The chunking is fixed by ``chunk``, not by the thread count, so the result is the same
    serial or parallel. Four accumulators per chunk break the add dependency chain.
    """
    n = x.size
    for c in prange(partial.size):
        lo = c * chunk
        hi = min(n, lo + chunk)
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        i = lo
        while i + 4 <= hi:
            x0 = np.float64(x[i])
            x1 = np.float64(x[i + 1])
            x2 = np.float64(x[i + 2])
            x3 = np.float64(x[i + 3])
            a0 += x0 * x0
            a1 += x1 * x1
            a2 += x2 * x2
            a3 += x3 * x3
            i += 4
        while i < hi:
            x0 = np.float64(x[i])
            a0 += x0 * x0
            i += 1
        partial[c] = (a0 + a1) + (a2 + a3)


@dual("optim")
def scale(x, s, out):
    """``out = s·x``; ``x, out (n,)``, ``s`` a scalar of ``x``'s dtype."""
    for i in prange(x.size):
        out[i] = x[i] * s


# --- whole-tree updates -------------------------------------------------------------------
# One compiled call updates a group of arrays, so a small model pays one dispatch instead
# of one per array. Plural names are TUPLES of 1-D arrays, one per parameter, each passed
# to the single-array serial kernel above. (Large groups use the parallel single-array
# builds from Python instead: numba 0.68's parfor pass silently drops the writes of a
# prange loop whose output arrays were unpacked from a tuple, so no prange here.)
_sgd_step_serial = sgd_step.serial
_sgd_momentum_step_serial = sgd_momentum_step.serial
_adagrad_step_serial = adagrad_step.serial
_rmsprop_step_serial = rmsprop_step.serial
_adam_step_serial = adam_step.serial


@jit
def sgd_multi(ps, gs, lr, wd, p_outs):
    """``sgd_step`` over tuples of arrays."""
    for k in range(len(ps)):
        _sgd_step_serial(ps[k], gs[k], lr, wd, p_outs[k])


@jit
def sgd_momentum_multi(ps, gs, bufs, lr, wd, momentum, one_minus_dampening, nesterov, first,
                       p_outs, buf_outs):
    """``sgd_momentum_step`` over tuples of arrays."""
    for k in range(len(ps)):
        _sgd_momentum_step_serial(ps[k], gs[k], bufs[k], lr, wd, momentum, one_minus_dampening,
                                 nesterov, first, p_outs[k], buf_outs[k])


@jit
def adagrad_multi(ps, gs, ss, clr, wd, eps, p_outs, s_outs):
    """``adagrad_step`` over tuples of arrays."""
    for k in range(len(ps)):
        _adagrad_step_serial(ps[k], gs[k], ss[k], clr, wd, eps, p_outs[k], s_outs[k])


@jit
def rmsprop_multi(ps, gs, sqs, gas, bufs, lr, alpha, one_minus_alpha, eps, wd, momentum,
                  centered, p_outs, sq_outs, ga_outs, buf_outs):
    """``rmsprop_step`` over tuples of arrays."""
    for k in range(len(ps)):
        _rmsprop_step_serial(ps[k], gs[k], sqs[k], gas[k], bufs[k], lr, alpha, one_minus_alpha,
                            eps, wd, momentum, centered, p_outs[k], sq_outs[k], ga_outs[k],
                            buf_outs[k])


@jit
def adam_multi(ps, gs, ms, vs, vmaxs, decay, wd, one_minus_beta1, beta2, one_minus_beta2, eps,
               step_size, bc2_sqrt, amsgrad, p_outs, m_outs, v_outs, vmax_outs):
    """``adam_step`` over tuples of arrays."""
    for k in range(len(ps)):
        _adam_step_serial(ps[k], gs[k], ms[k], vs[k], vmaxs[k], decay, wd, one_minus_beta1, beta2,
                         one_minus_beta2, eps, step_size, bc2_sqrt, amsgrad, p_outs[k], m_outs[k],
                         v_outs[k], vmax_outs[k])


def run(step_kernel, multi_kernel, work, *args):
    """Run an update on tuples ``args``. When the whole group is big enough
    (``config.use_parallel("optim", work)``), every array of at least 1/8 of the threshold
    runs the parallel single-array build, and one serial ``multi_kernel`` call does the
    rest (there the big arrays are swapped for empty views); else one serial call does all.
    A parallel region per small array (a bias) cost more than its update: mlp_mnist's six
    arrays took 0.17 ms as six parallel calls. But once one region has woken the workers,
    the next costs 2-3 µs, less than the serial time saved on ~10k elements or more."""
    if len(args[0]) == 1:       # one array each (a pack's buffer): the single-array build
        return step_kernel(*[a[0] if isinstance(a, tuple) else a for a in args], work=work)
    if not config.use_parallel("optim", work):
        multi_kernel(*args)
        return
    n = len(args[0])
    big = [k for k in range(n) if config.use_parallel("optim", 8 * args[0][k].size)]
    for k in big:
        step_kernel.parallel(*[a[k] if isinstance(a, tuple) else a for a in args])
    if len(big) < n:
        rest = [tuple(x[:0] if k in big else x for k, x in enumerate(a))
                if isinstance(a, tuple) else a for a in args]
        multi_kernel(*rest)
