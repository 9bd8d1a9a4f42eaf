"""The command lines and the Python API: `from pipeline import Separator` (pipeline/api.py)."""


def __getattr__(name):
    if name == "Separator":  # imported on first use: `import pipeline.run` stays free of the API's imports
        from pipeline.api import Separator

        return Separator
    raise AttributeError(f"module 'pipeline' has no attribute '{name}'")
