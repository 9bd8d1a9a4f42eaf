from setuptools import find_packages, setup

setup(
    name="music-separation",
    version="0.4.1",
    description="Music source separation pipeline in TensorFlow/Keras: prepare, train, evaluate, export.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "components", "components.*", "models", "models.*",
                                    "configs"]),
    package_data={"components.inference": ["catalogue.json"]},  # the released-model catalogue
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy>=1.26",
        "scipy>=1.11",  # band-limited polyphase resampling
        "soundfile>=0.12",
        "musdb>=0.4.2",
        "museval>=0.4.1",
        "sacred>=0.8.5",
        "setuptools<81",  # sacred imports pkg_resources, which setuptools 81 removed
        "matplotlib>=3.7",  # evaluation box plots
        "tensorboard>=2.16",  # training logs (keras.callbacks.TensorBoard)
        "ai-edge-litert>=1.2",  # runs exported .tflite models
        "tensorflow-serving-api>=2.21,<2.22",  # TF Serving's protos: the export's warm-up requests
    ],
    extras_require={
        "db": ["SQLAlchemy>=2", "psycopg[binary]>=3.1", "pymongo>=4"],
        # prepare.runner=beam (and evaluation on Beam): ~365 MB installed (pyarrow), protobuf 6 beside TF 2.21
        "beam": ["apache-beam>=2.77"],
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.1"],
        # separate --server: TF Serving's gRPC client (already installed with the core for the warm-up protos;
        # named so that `pip install music-separation[serving]` says what the client needs)
        "serving": ["tensorflow-serving-api>=2.21,<2.22", "grpcio>=1.60"],
        "dev": ["pytest>=8", "SQLAlchemy>=2", "psycopg[binary]>=3.1", "apache-beam>=2.77", "mkdocs==1.6.1",
                "mkdocs-material==9.8.1", "tensorflow-serving-api>=2.21,<2.22", "grpcio>=1.60"],
    },
    entry_points={
        "console_scripts": [
            "musicsep=pipeline.cli:main",
            # earlier names, kept as aliases of `musicsep run|separate|benchmark|sweep`
            "musicsep-pipeline=pipeline.run:main",
            "separate=pipeline.separate:main",
            "musicsep-benchmark=pipeline.benchmark:main",
            "sweep=pipeline.sweep:main",
        ]
    },
)
