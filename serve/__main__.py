"""`python -m serve ...`: Ray Serve app and client, SageMaker and ONNX export."""

import sys

from core.cli import dispatch

# Each module defines register(subparsers); see core/cli.py.
COMMANDS = ("serve.app", "serve.client", "serve.sagemaker.cli", "serve.onnx_export", "serve.batch.cli")

if __name__ == "__main__":
    sys.exit(dispatch("python -m serve", __doc__, COMMANDS))
