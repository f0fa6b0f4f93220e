# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ship-peft",
    version="0.1.0",
    description="SHIP (Semantic Hierarchical Prompt tuning, ICASSP 2025) for Vision Transformers as a Hugging Face PEFT method",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["ship_peft", "ship_peft.*"]),
    package_data={"ship_peft.assets": ["tiny-vit-fractal-1k/*", "digits/*"]},
    entry_points={"console_scripts": ["ship-peft = ship_peft.app.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.21,<0.22",
        "accelerate>=1.0",
        "datasets>=4.0",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        # the command line (ship_peft/app): its pictures; the library (ship_peft) installs and imports without it
        "cli": ["matplotlib>=3.7", "pillow>=10"],
        # ONNX export (ship_peft/export.py) and running the file: onnxruntime
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        "test": ["matplotlib>=3.7", "pillow>=10", "onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "pytest>=8", "scikit-learn>=1.4", "scikit-image>=0.22", "hypothesis>=6", "tensorboard>=2.14"],
        "bench": ["scikit-learn>=1.4", "scikit-image>=0.22"],
        # timm VisionTransformer backbones (ship_peft/backbones/timm_vit.py). Not in the test extra yet: timm needs
        # torchvision, and the registries CI reaches serve only CUDA torchvision wheels, which do not import with
        # the CPU torch CI pins.
        "timm": ["timm>=1.0"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
