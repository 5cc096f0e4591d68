"""Install `dsca` as one package from the four top-level source folders.

The folders keep the layout of the user's design card (dsca/, kernels/, store/, cli/) while
installing under a single namespace, so nothing lands in site-packages under a generic name
such as `store` or `cli`.
"""
from setuptools import setup

setup(
    name="dsca",
    version="0.1.0",
    description=(
        "DSCA survival models on whole-slide-image pyramids: a Zarr feature store for CLAM "
        "outputs, fused Triton CAPool kernels and a training CLI"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "dsca", "dsca.config", "dsca.infer", "dsca.labels", "dsca.layers", "dsca.metrics", "dsca.train",
        "dsca.kernels", "dsca.store", "dsca.cli",
    ],
    package_dir={
        "dsca": "dsca",
        "dsca.kernels": "kernels",
        "dsca.store": "store",
        "dsca.cli": "cli",
    },
    install_requires=[
        # 2.6: torch.library.triton_op (the Triton kernels inside torch.compile graphs); accepts
        # the CPU build on the developers' disk (2.13) and newer CUDA builds.
        "torch>=2.6",
        "triton>=3.0",
        "zarr>=3.1,<4",  # atomic metadata writes + fork handling the store relies on
        "numcodecs>=0.15",
        "nystrom-attention>=0.0.11",
        "einops>=0.7",
        "pandas>=2.0",
        "h5py>=3.8",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        # Kaplan-Meier / training-curve plots.
        "matplotlib>=3.7",
        # OpenSlide reads every vendor's WSI format (dsca.wsi); tifffile writes the synthetic pyramids.
        "openslide-python>=1.4",
        "openslide-bin>=4.0",
        "tifffile>=2023.1",
    ],
    extras_require={
        # scikit-survival and lifelines are the independent oracles that dsca's own survival
        # metrics and Cox loss are tested against (tests/training/test_training_oracles.py);
        # they are not needed at run time.
        # s3fs and moto's server: tests/store/test_store_s3.py runs the store against a real S3
        # server on 127.0.0.1 (no cloud account needed).
        "test": ["pytest>=8", "pytest-benchmark>=4", "scikit-survival>=0.23", "lifelines>=0.28",
                 "s3fs>=2024.12", "moto[server]>=5"],
        # stores on S3 (`s3://bucket/cohort.zarr`): zarr's FsspecStore needs fsspec's S3 file
        # system, s3fs; it pins fsspec to its own release, so pip picks the s3fs of the fsspec
        # in use. Other object stores need their fsspec package (gcsfs, adlfs) instead.
        "s3": ["s3fs>=2024.12"],
        # the S3 benchmark reads from moto's server too (it skips without them)
        "bench": ["pytest>=8", "pytest-benchmark>=4", "s3fs>=2024.12", "moto[server]>=5"],
    },
    entry_points={
        "console_scripts": [
            "dsca=dsca.cli.dsca_main:main",
            "dsca-store=dsca.cli.store_main:main",
        ],
    },
)
