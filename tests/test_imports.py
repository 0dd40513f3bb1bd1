"""The core library must import and run without TensorFlow (GPU machines have none)."""

import subprocess
import sys

CORE_MODULES = [
    "stmoe", "stmoe.config", "stmoe.layers.attention", "stmoe.layers.position", "stmoe.models.api",
    "stmoe.models.transformer", "stmoe.models.info", "stmoe.moe", "stmoe.decoding", "stmoe.gin_utils", "stmoe.cli",
    "stmoe.checkpoints", "stmoe.training.step", "stmoe.training.trainer", "stmoe.evaluation.loss",
    "stmoe.cli.train", "stmoe.cli.export", "stmoe.cli.info",
]


def test_core_imports_without_tensorflow():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE_MODULES) +
          "bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.') or m == 'seqio')\n"
          "assert not bad, bad\n"
          "from stmoe.config import ModelConfig\n"
          "from stmoe.models.api import make_model\n"
          "import jax\n"
          "m = make_model(ModelConfig(vocab_size=16, d_model=8, num_heads=2, d_kv=4, d_ff=8, num_encoder_layers=1,"
          " num_decoder_layers=1))\n"
          "m.get_initial_variables(jax.random.PRNGKey(0), {'encoder_input_tokens': (1, 3), 'decoder_input_tokens': (1, 2)})\n"
          "bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True)
