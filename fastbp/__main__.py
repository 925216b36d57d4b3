"""The ``fastbp`` command line: ``demo``, ``bench`` and ``info``."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def cmd_demo(args):
    from fastbp import demo
    return demo.run(args.model, epochs=args.epochs, seed=args.seed,
                    progress=not args.no_progress)


def cmd_info(args):
    import importlib.metadata
    import numba
    import scipy

    import fastbp as F
    from fastbp import _blas, _malloc, config
    from fastbp.kernels.activations import relu_forward

    z = np.zeros(4, np.float32)
    relu_forward.parallel(z, np.empty_like(z))   # starts the thread pool, fixing the layer
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    peers = []
    for name in ("torch", "jax"):
        try:
            peers.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    layer_env = os.environ.get("NUMBA_THREADING_LAYER")
    rows = [
        ("fastbp", F.__version__), ("python", sys.version.split()[0]), ("numpy", np.__version__),
        ("scipy", scipy.__version__), ("numba", numba.__version__),
        ("peers", ", ".join(peers) or "none installed"),
        ("threading layer", f"{numba.threading_layer()} (requested: "
                            f"{layer_env + ' by NUMBA_THREADING_LAYER' if layer_env else 'threadsafe'})"),
        ("threads", f"{F.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS} "
                    f"(fastbp.set_num_threads / NUMBA_NUM_THREADS)"),
        ("cpus", os.cpu_count()),
        ("BLAS (numpy)", f"{blas.get('name', '?')} {blas.get('version', '')}".strip()),
        ("BLAS (kernels)", _kernels_blas()),
        ("BLAS (scipy)", _scipy_blas()),
        ("BLAS (one-thread GEMMs)", (f"MKL from M, N, K >= 32, else the kernels' OpenBLAS; "
                                     f"{_blas.mkl.layer} layer (FASTBP_MKL=0 to switch off): "
                                     f"{_blas.mkl.version}"
                                     if _blas.mkl is not None else
                                     "as the kernels (pip install \"fastbp[mkl]\" for MKL)")),
        ("OpenMP idle workers", _wait_policy()),
        ("OPENBLAS_THREAD_TIMEOUT", f"{_blas.thread_timeout()} in force (2^n cycles; "
                                    + ("set by user)" if config.USER_SET_BLAS_TIMEOUT
                                       else "fastbp asks for 20)"
                                       if "OPENBLAS_THREAD_TIMEOUT" in config.SET_BY_FASTBP
                                       else "FASTBP_ENV_DEFAULTS=0)")),
        ("malloc", _malloc.state),
        ("cache dir", f"{config.CACHE_DIR or '-'} ({config.CACHE_SOURCE}; "
                      f"{config.STALE_KERNELS_DROPPED} stale kernels dropped at import)"),
    ]
    for k, v in rows:
        print(f"{k:<24} {v}")
    print("parallel thresholds (work units; FASTBP_PARALLEL_THRESHOLD or "
          "fastbp.set_parallel_threshold override):")
    defaults = config.default_thresholds()
    for k, v in config.thresholds.items():
        src = ("env" if k in config.ENV_THRESHOLDS and v == config.ENV_THRESHOLDS[k] else
               "default" if v == defaults[k] else "set")
        print(f"  {k:<22} {v:>10}  ({src})")
    return 0


def _wait_policy():
    """How libgomp's idle workers wait, and who chose it (see fastbp/config.py)."""
    from fastbp import config
    pol = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    what = " ".join(x for x in (pol and f"OMP_WAIT_POLICY={pol}",
                                spin and f"GOMP_SPINCOUNT={spin}") if x) or "libgomp's default"
    who = ("set by user" if config.USER_SET_WAIT_POLICY else
           "set by fastbp" if config.SET_BY_FASTBP and set(config.SET_BY_FASTBP) &
           {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} else "FASTBP_ENV_DEFAULTS=0")
    return f"{what} ({who})"


def _kernels_blas():
    """Which library the kernels' threaded GEMMs call (see fastbp/_blas.py)."""
    from fastbp import _blas
    if _blas.dense_mkl:
        return (f"MKL, threads per GEMM size (FASTBP_MKL_DENSE=0 for {_blas.name}'s "
                "OpenBLAS)")
    if _blas.name is None:
        return "none with CBLAS (kernels use Numba's np.dot through SciPy)"
    why = ("FASTBP_BLAS" if os.environ.get("FASTBP_BLAS") else
           "NumPy's spins longer: NumPy was imported before fastbp" if _blas.name == "scipy"
           and _blas.numpy_lib is not None else "default")
    from fastbp import config
    if _blas.mkl is not None and config.mkl_dense_flag() == "":
        why += (f"; MKL's threaded GEMMs are off on this CPU ({config.cpu_vendor()}), "
                "FASTBP_MKL_DENSE=1 to use them")
    return f"{_blas.name}'s OpenBLAS ({why}): {os.path.basename(_blas.library)}"


def _scipy_blas():
    try:
        import scipy
        cfg = scipy.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        return f"{b.get('name', '?')} {b.get('version', '')}".strip()
    except Exception:  # pragma: no cover - depends on scipy's build
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastbp", description="fastbp command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train a small network on the embedded digits data")
    d.add_argument("--model", default="cnn", choices=["cnn", "mlp", "lstm"],
                   help="cnn: LeNet-style CNN on the digits (default); mlp: a perceptron on "
                        "the digits; lstm: a character-level language model")
    d.add_argument("--epochs", type=int, default=None,
                   help="default: 20 (cnn), 30 (mlp), 6 (lstm)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("bench", help="fastbp vs PyTorch/JAX on the standard workloads",
                   add_help=False)
    sub.add_parser("info", help="versions, threads, BLAS, cache and thresholds")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from fastbp import bench
        return bench.main(argv[1:])
    args = ap.parse_args(argv)
    return {"demo": cmd_demo, "info": cmd_info}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
