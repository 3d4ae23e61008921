"""tritonkit: Hugging Face multimodal models as Triton Inference Server model repositories."""

from tritonkit.errors import TritonkitError

__version__ = "0.1.0"
__all__ = ["TritonkitError", "__version__"]
