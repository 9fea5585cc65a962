"""Evaluation: the pairwise Elo tournament (`qlora_jax.eval.elo`) and its judges."""
