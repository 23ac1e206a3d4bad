"""Builds tidar_kernels + tidar. The CUDA extension (csrc/) is added by the CUDA-kernels issue;
until then this is a pure-Python wheel. No network or git calls here."""
from setuptools import find_packages, setup

setup(
    name="tidar-kernels",
    version="0.1.0",
    description="TiDAR (Think in Diffusion, Talk in Autoregression): kernels and Hugging Face integration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tidar_kernels", "tidar_kernels.*"]) + find_packages("python") + ["tidar.models"],
    # The bundled demo model ships inside the wheel as tidar/models/ (tidar.demo looks there when installed).
    package_dir={"tidar": "python/tidar", "tidar.models": "models"},
    package_data={"tidar.models": ["tidar-stdlib-tiny/*"]},
    install_requires=["torch>=2.11", "transformers>=5.17,<6", "safetensors", "tokenizers>=0.21"],
    extras_require={"test": ["pytest>=8", "numpy", "scipy"], "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["tidar=tidar.cli:main"]},
)
