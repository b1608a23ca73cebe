"""kdiqa-edge: distil a CLIP image-quality teacher into small students and ship them to the edge.

This module stays torch-free: `from kdiqa_edge import QualityModel` works on a Jetson or a Mac
with numpy, pillow and the runtime of the artifact only.
"""

__version__ = "0.1.0"

__all__ = ["QualityModel", "__version__"]


def __getattr__(name):
    # Lazy, so that `import kdiqa_edge` costs nothing and never pulls a runtime in.
    if name == "QualityModel":
        from kdiqa_edge.runtime import QualityModel

        return QualityModel
    raise AttributeError(f"module 'kdiqa_edge' has no attribute {name!r}")
