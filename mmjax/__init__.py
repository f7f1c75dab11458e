"""mmjax: multimodal sentiment analysis under noisy and missing modalities, in JAX."""

__version__ = "0.1.0"
