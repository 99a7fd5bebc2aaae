"""deltalog on AWS Lambda: the handlers ``deploy/template.yaml`` names.

- ``deltalog_lambda.ingest.handler``: an SQS batch of receipts in, one
  delta per receipt, SQS's partial batch response out;
- ``deltalog_lambda.compact.handler``: a scheduled event (one log) or an
  SQS batch of S3 notifications in, ``run_once`` per log, the
  ``CompactionResult`` as JSON out;
- ``deltalog_lambda.query.handler``: a function URL request in, a
  Chroma-shaped answer out.

This package sits above both ``deltalog`` and ``compactor`` (neither
imports it). Configuration comes from the environment
(``deltalog_lambda.settings``), secrets from Secrets Manager or SSM at run
time (``deltalog_lambda.secrets``), metrics go out as CloudWatch Embedded
Metric Format (``deltalog_lambda.metrics``). Install with the ``aws`` extra
(``pip install 'deltalog[aws]'``), as ``deploy/Dockerfile`` does.
"""
