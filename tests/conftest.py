"""Test setup: float32 matmuls at full precision so comparisons are meaningful on any backend."""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")
