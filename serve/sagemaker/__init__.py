"""SageMaker path: model.tar.gz export, container image URIs, boto3 deployment, invocation, batch transform.

``inference.py`` here is a template that becomes ``code/inference.py`` in the archive; it imports the
vendored ``gliomaseg_core`` package and is never imported from this repository.
"""
