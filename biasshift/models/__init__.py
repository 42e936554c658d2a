"""The paper's architectures as builders with stable module names."""

from biasshift.models.mlp import autoencoder, count_parameters, he_init_, mlp, paper_mlp

__all__ = ["autoencoder", "count_parameters", "he_init_", "mlp", "paper_mlp"]
