"""teacherlm_jax: the TeacherLM method (He et al., 2023, arXiv 2310.19019) in JAX/Flax."""

__version__ = "0.1.0"
